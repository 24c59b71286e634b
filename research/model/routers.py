"""Router networks: they only score tokens; research/routing.py turns scores into decisions.

MoR routers (shared/specs/mor.md §2.1, paper App. G.1), `num` of them stacked on a leading axis
(one per recursion step for expert choice, one for token choice), no biases, N(0, 0.02) init:
  linear    s = x W
  mlp       s = GELU(x W1) W2, hidden 2d (the official code)
  wide_mlp  s = GELU(x W1) W2, hidden 4d (the paper's text; the official code's wide_mlp is the
            same 2d MLP as mlp, so its W-MLP rows are 2d)
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
  10x learning rate (§2.3) without a second optimizer.
  """

  def __init__(self, num: int, d: int, out: int, arch: str, *, std: float, param_dtype,
               rngs: nnx.Rngs, lr_mult: float = 1.0):
    hidden = HIDDEN[arch] * d
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
