"""Router networks: they only score tokens; research/routing.py turns scores into decisions.

MoR routers (docs/methods/mor.md §2.1, paper App. G.1), `num` of them stacked on a leading axis
(one per recursion step for expert choice, one for token choice), no biases, N(0, 0.02) init:
  linear    s = x W
  mlp       s = GELU(x W1) W2, hidden 2d (the official code)
  wide_mlp  s = GELU(x W1) W2, hidden 4d (the paper's text; the official code's wide_mlp is the
            same 2d MLP as mlp, so its W-MLP rows are 2d)

The MoE layer's MLP router (model.moe.router="mlp", RMoE Tab. 1's SMoE-MLP) is the mlp arch with
an explicit hidden width m (`hidden`).

RMoE's layerwise recurrent MoE router (Qiu et al. 2024 §3.2, Eq. 4-6; docs/methods/
rrt_coe_rmoe_rexmoe.md §3.1): RecurrentRouter of MoE layer i, one GRUCell shared by all layers.
"""

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

HIDDEN = {"linear": 0, "mlp": 2, "wide_mlp": 4}  # hidden width in multiples of d


class RouterBias(nnx.Variable):
  """A non-trainable router bias (loss-free balancing), rewritten by the train step."""


class Counter(nnx.Variable):
  """Optimizer steps seen so far (capacity / balance warm-up), rewritten by the train step."""


class Router(nnx.Module):
  """`num` stacked router networks from width d to `out` float32 logits.

  `lr_mult` m stores W / m and applies m W, so Adam moves W m times faster: the auxiliary router's
  10x learning rate (§2.3) without a second optimizer. `hidden` replaces the MLP archs' hidden
  width HIDDEN[arch] d.
  """

  def __init__(self, num: int, d: int, out: int, arch: str, *, std: float, param_dtype,
               rngs: nnx.Rngs, lr_mult: float = 1.0, hidden: int | None = None):
    hidden = HIDDEN[arch] * d if hidden is None or not HIDDEN[arch] else hidden
    init = nnx.with_partitioning(nnx.initializers.normal(std / lr_mult), (None, "embed", None))
    self.w1 = nnx.Param(init(rngs.params(), (num, d, hidden or out), param_dtype))
    init2 = nnx.with_partitioning(nnx.initializers.normal(std / lr_mult), (None, None, None))
    self.w2 = nnx.Param(init2(rngs.params(), (num, hidden, out), param_dtype)) if hidden else None
    self.lr_mult = lr_mult

  def __call__(self, x_BTD: Array, i: int) -> Array:
    """Logits [B, T, out] of router i, computed in float32."""
    h = x_BTD.astype(jnp.float32) @ (self.lr_mult * self.w1[i].astype(jnp.float32))
    if self.w2 is not None:
      h = jax.nn.gelu(h, approximate=False) @ (self.lr_mult * self.w2[i].astype(jnp.float32))
    return h


class GRUCell(nnx.Module):
  """One GRU cell, input size = hidden size = p, in float32 (PyTorch nn.GRUCell convention, the
  RMoE code's rnn.py; the paper's Eq. 2-3 without its U_h typo), gates stacked (r, z, n):

    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)      z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn))    h' = (1 - z) * n + z * h

  6 p^2 + 6 p parameters, PyTorch's standard init U(-1/sqrt(p), 1/sqrt(p)) for all of them (the
  released run "..._GRU_standard_init"; spec §3.1).
  """

  def __init__(self, p: int, *, param_dtype, rngs: nnx.Rngs):
    bound = p**-0.5

    def uniform(shape):
      init = nnx.with_partitioning(lambda key, s, dt: jax.random.uniform(key, s, dt, -bound, bound),
                                   (None,) * len(shape))
      return nnx.Param(init(rngs.params(), shape, param_dtype))

    self.w_i, self.w_h = uniform((3, p, p)), uniform((3, p, p))
    self.b_i, self.b_h = uniform((3, p)), uniform((3, p))

  def __call__(self, x_NP: Array, h_NP: Array) -> Array:
    """The next state h' [..., p] from the input x and the state h [..., p] (float32)."""
    w_i, w_h, b_i, b_h = (v[...].astype(jnp.float32)
                          for v in (self.w_i, self.w_h, self.b_i, self.b_h))
    bias = lambda b_P: jnp.broadcast_to(b_P, h_NP.shape)
    gi = [x_NP @ w_i[g] + bias(b_i[g]) for g in range(3)]
    gh = [h_NP @ w_h[g] + bias(b_h[g]) for g in range(3)]
    r, z = jax.nn.sigmoid(gi[0] + gh[0]), jax.nn.sigmoid(gi[1] + gh[1])
    n = jnp.tanh(gi[2] + r * gh[2])
    return (1 - z) * n + z * h_NP


RECURRENCE = ("full", "detach", "none")


class RecurrentRouter(nnx.Module):
  """RMoE router of one MoE layer i (Eq. 4-6): x'_i = x_i Proj_i, h_i = GRU(x'_i, h_{i-1}),
  logits_i = h_i G_i, float32. Proj_i [D, P] and G_i [P, E] belong to the layer (no biases,
  N(0, std); the code leaves them uninitialised, spec §3.4 defect 2); `gru` is the one cell
  shared by all layers. h_0 = 0. `recurrence`: "full" backpropagates through the layer
  recurrence (the paper's RMoE); "detach" stops the gradient of h_{i-1} (Tab. 4 "detach");
  "none" uses h_{i-1} = 0, a stateless 2-layer router with the same parameters (RMoE-NP).
  """

  def __init__(self, d: int, p: int, out: int, gru: GRUCell, *, recurrence: str, std: float,
               param_dtype, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.normal(std), ("embed", None))
    self.proj = nnx.Param(init(rngs.params(), (d, p), param_dtype))
    init2 = nnx.with_partitioning(nnx.initializers.normal(std), (None, None))
    self.gate = nnx.Param(init2(rngs.params(), (p, out), param_dtype))
    self.gru = gru
    self.recurrence = recurrence

  def __call__(self, x_BTD: Array, h_BTP: Array | None) -> tuple[Array, Array]:
    """(logits [B, T, out], h_i [B, T, P]) from x_i and h_{i-1} (None: h_0 = 0)."""
    x_BTP = x_BTD.astype(jnp.float32) @ self.proj[...].astype(jnp.float32)
    if h_BTP is None or self.recurrence == "none":
      h_BTP = jnp.zeros_like(x_BTP)
    elif self.recurrence == "detach":
      h_BTP = jax.lax.stop_gradient(h_BTP)
    h_BTP = self.gru(x_BTP, h_BTP)
    return h_BTP @ self.gate[...].astype(jnp.float32), h_BTP
