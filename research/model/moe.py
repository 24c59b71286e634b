"""Routed Mixture-of-Experts as the FFN slot of a Block (docs/moe.md).

Token choice over E SwiGLU experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral;
DeepSeekMoE), one execution path select -> gather -> compute -> scatter-add with gate:

  s = score(x W_r)                     router logits in float32, softmax | sigmoid (routing.py)
  (w, e) = top-k of s                  renormalised to sum 1 if asked (Mixtral, DeepSeek-V3)
  y = sum_{i<k} w_i E_{e_i}(x) + sum_j S_j(x)     E_n(x) = down_n(silu(gate_n x) * up_n x),
                                                  S_j: always-on shared experts (DeepSeekMoE)

With capacity_factor f > 0 each expert takes at most C = ceil(T k / E) f assignments per row, in
token order (MaxText); an assignment past C is dropped: it adds 0 (the block's residual still
carries the token). impl "dense" runs every expert on every token and masks the combine (the
reference); "ragged" sorts the assignments by expert and runs jax.lax.ragged_dot grouped matmuls,
then unsorts and sums with the gates. Both give the same values and gradients (tests/test_moe.py).

Chain-of-Experts (Wang et al. 2025, docs/methods/rrt_coe_rmoe_rexmoe.md §2.1; docs/moe.md) is
the same layer iterated C = `iterations` times over the SAME experts, iteration t routed by its own
router t (routers.Router stacks C of them; one with coe_shared_router), top-k per iteration, the
shared experts run at every iteration:

  x^(0) = x,   x^(t) = [x^(t-1) +] MoE_t(x^(t-1)),   y = x^(C)

with the residual between iterations ("[x^(t-1) +]") and the block's own residual (Block adds its
input unless `outer_residual` is False) chosen by coe_residual, as the official code's flags
(inner_residual, outer_residual): "outer" (F, T) = the standard pre-norm block (plain MoE at C=1),
"inner" (T, F: the code's default, so the block's output is norm(h) + sum of the updates),
"inner_outer" (T, T).

An MLP router (model.moe.router="mlp", RMoE Tab. 1's "SMoE-MLP" baseline) scores
logits = GELU(x W1) W2, W1 [D, m], W2 [m, E] (r E with ReXMoE), one per CoE iteration like the
linear router.

RMoE (Qiu et al. 2024, spec §3; model.moe.router="gru"): the logits of MoE layer i come from
routers.RecurrentRouter, h_i = GRU(x_i Proj_i, h_{i-1}), logits = h_i G_i, with one GRU cell for
the whole model (RoutedFFNs builds it) and h carried from block to block in layers.Carry.

ReXMoE (spec §4; model.moe.rex_group r > 1): the MoE layers form disjoint groups of r adjacent
ones; each layer's router scores the r E experts of its group (its own at candidates
[member E, (member + 1) E)), stored once per group as one stacked ExpertPool that every member
holds, so a layer selecting a neighbour's expert uses that very parameter. Progressive Scaling
Routing (model.moe.psr, §4.2) zeroes the scores of all but N_t candidates (Eq. 6, or Tab. 5's
stepwise schedule) before the top-k, the layer's own experts first, the rest drawn per step and
layer from the training step in the carry. With psr_start_experts N_0 < E it also runs on a plain
MoE (r = 1): N_t grows from N_0 to E, a random N_t-subset of the layer's experts.

CoE combines with ReXMoE (iteration t's router scores the group's r E pooled experts, under the
layer's PSR mask of the step) but not with RMoE (config.py refuses router="gru" with C > 1).

Aux of one gate call: "loss/moe_balance" = balance_coeff * B with B = E sum_e f_e P_e over the
batch, or its mean over rows (balance_scope="sequence", DeepSeek's seq_aux), "loss/moe_z" =
z_coeff * mean logsumexp(logits)^2, and the statistics "moe/balance", "moe/z", "moe/load" [E]
(fraction of assignments per expert), "moe/max_violation", "moe/dropped" (fraction of assignments
past capacity), "moe/layers" (1). A CoE layer sums its C gate calls' losses (the official code adds
every gate call's loss) and averages their statistics (`iteration_aux`), one application; the
model sums layers with `aux.add_aux` and averages them with `aux.mean_over_layers`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research import routing
from research.kernels import dispatch
from research.model import aux as aux_lib
from research.model import expert_parallel, routed, routers
from research.model.layers import NO_CARRY, Carry, SwiGLU, normal_init

Array = jax.Array


def expert_d_ff(m: mlc.ConfigDict) -> int:
  """Hidden width of one expert: model.moe.d_ff, or model.d_ff when it is -1."""
  return m.d_ff if m.moe.d_ff == -1 else m.moe.d_ff


def is_moe_layer(m: mlc.ConfigDict, layer: int) -> bool:
  """Whether unique layer `layer` (0-based: prelude, shared, coda blocks in order; the layer index
  of a plain stack) has the routed FFN: after the first `first_dense` (DeepSeek
  first_k_dense_replace), every `every`-th layer, (l + 1) % every == 0 (MaxText interleave)."""
  c = m.moe
  return c.num_experts > 0 and layer >= c.first_dense and (layer + 1) % c.every == 0


def num_candidates(m: mlc.ConfigDict) -> int:
  """Experts a routed layer chooses from (its router's outputs): E, or r E with ReXMoE."""
  return m.moe.num_experts * m.moe.rex_group


PSR_SEED = 0  # PSR masks: key fold_in(fold_in(key(PSR_SEED), step), layer), reproducible per step


def router_mlp_dim(m: mlc.ConfigDict) -> int:
  """Hidden width m of the MLP router: model.moe.router_mlp_dim, or 2 gru_dim when it is -1 (RMoE
  Tab. 1's SMoE-MLP: 0.75M router parameters on enwik8 = 8 (352 m + 16 m) at m = 256 = 2 p)."""
  c = m.moe
  return 2 * c.gru_dim if c.router_mlp_dim == -1 else c.router_mlp_dim


def psr_first(m: mlc.ConfigDict) -> int:
  """PSR's N_0, the candidates routable up to t_s: model.moe.psr_start_experts, or E when -1."""
  c = m.moe
  return c.num_experts if c.psr_start_experts == -1 else c.psr_start_experts


def psr_applies(m: mlc.ConfigDict) -> bool:
  """Whether the routed layers mask candidates by PSR: a ReXMoE group (r > 1), or a plain MoE
  whose N_0 < E (the R1 control)."""
  c = m.moe
  return c.num_experts > 0 and c.psr and (c.rex_group > 1 or psr_first(m) < c.num_experts)


def router_params(m: mlc.ConfigDict) -> int:
  """Router parameters of one routed layer: W_r d E (linear) or W1 d m + W2 m E (mlp), one per
  CoE iteration unless coe_shared_router; or RMoE's Proj_i d p + G_i p E."""
  c, e = m.moe, num_candidates(m)
  if c.router == "gru":
    return (m.d_model + e) * c.gru_dim
  per_router = (m.d_model + e) * router_mlp_dim(m) if c.router == "mlp" else m.d_model * e
  return (1 if c.coe_shared_router else c.iterations) * per_router


def shared_router_params(m: mlc.ConfigDict) -> int:
  """Router parameters shared by all routed layers: RMoE's GRU cell 6 p^2 + 6 p (spec §3.2)."""
  p = m.moe.gru_dim
  return 6 * p * p + 6 * p if m.moe.num_experts and m.moe.router == "gru" else 0


def router_macs(m: mlc.ConfigDict) -> int:
  """Multiply-adds per token of one routed layer's router call (one per CoE iteration): d E, the
  MLP's d m + m E, or d p + 6 p^2 + p E (RMoE: Proj_i, the GRU's six p x p maps, G_i)."""
  c, e = m.moe, num_candidates(m)
  if c.router == "linear":
    return m.d_model * e
  if c.router == "mlp":
    return (m.d_model + e) * router_mlp_dim(m)
  return (m.d_model + 6 * c.gru_dim + e) * c.gru_dim


class Routing(NamedTuple):
  """One MoE routing decision. logits_BTE float32; weights_BTK the gates (0 where dropped);
  experts_BTK the chosen experts; keep_BTK the assignment is within capacity."""

  logits: Array
  weights: Array
  experts: Array
  keep: Array


def dense_experts(x_BTD: Array, w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array,
                  r: Routing) -> Array:
  """Reference: every expert on every token, combined with the gates (0 off the top-k)."""
  num_experts = w_gate_EDF.shape[0]
  combine_BTE = jnp.sum(jax.nn.one_hot(r.experts, num_experts) * r.weights[..., None], axis=2)
  h_BTEF = (jax.nn.silu(jnp.einsum("btd,edf->btef", x_BTD, w_gate_EDF))
            * jnp.einsum("btd,edf->btef", x_BTD, w_up_EDF))
  y_BTED = jnp.einsum("btef,efd->bted", h_BTEF, w_down_EFD)
  return jnp.einsum("bte,bted->btd", combine_BTE.astype(y_BTED.dtype), y_BTED)


def ragged_experts(x_BTD: Array, w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array,
                   r: Routing, gmm: str = "xla") -> Array:
  """Sorted path through routed.routed_apply: the N k assignments sorted by expert (dropped ones
  last, outside every group) are the slots, three grouped matmuls (`gmm`:
  research/kernels/dispatch.py, "xla" = jax.lax.ragged_dot) the compute, and the results come
  back by the inverse permutation, gate-weighted and summed over k (MaxText sparse_matmul)."""
  grouped_matmul = dispatch.grouped_matmul_fn(gmm)
  b, t, d = x_BTD.shape
  k, num_experts = r.experts.shape[-1], w_gate_EDF.shape[0]
  perm_M, sizes_E = routing.sort_by_expert(r.experts.reshape(-1), r.keep.reshape(-1), num_experts)
  inv_M = routing.inverse_permutation(perm_M)
  slots = routed.Slots(perm_M[None], r.keep.reshape(-1)[perm_M][None], inv_M[None])
  w_1M = routing.permute_rows(r.weights.reshape(-1, 1), perm_M, inv_M).reshape(1, -1)

  def experts(x_1MD: Array) -> tuple[Array, None]:
    x_MD = x_1MD[0]
    h_MF = (jax.nn.silu(grouped_matmul(x_MD, w_gate_EDF, sizes_E))
            * grouped_matmul(x_MD, w_up_EDF, sizes_E))
    return grouped_matmul(h_MF, w_down_EFD, sizes_E)[None], None

  x_1MD = jnp.repeat(x_BTD.reshape(b * t, d), k, axis=0)[None]  # assignment m = token m // k
  y_1MD, _ = routed.routed_apply(x_1MD, slots, experts, w_1M, mode="out")
  return jnp.sum(y_1MD.reshape(b * t, k, d), axis=1).reshape(b, t, d)


IMPLS = {"dense": dense_experts, "ragged": ragged_experts}


def stacked_experts(n: int, d: int, f: int, *, std: float, param_dtype, rngs: nnx.Rngs
                    ) -> tuple[nnx.Param, nnx.Param, nnx.Param]:
  """n SwiGLU experts: gate, up [n, D, F] and down [n, F, D], N(0, std)."""
  def stacked(shape, names):
    return nnx.Param(normal_init(std, names)(rngs.params(), shape, param_dtype))

  return (stacked((n, d, f), ("expert", "embed", "mlp")),
          stacked((n, d, f), ("expert", "embed", "mlp")),
          stacked((n, f, d), ("expert", "mlp", "embed")))


class ExpertPool(nnx.Module):
  """ReXMoE: the experts of a group of r MoE layers, [r E, ...], member j's at rows [j E, (j+1) E);
  held by every member (one parameter per group)."""

  def __init__(self, n: int, d: int, f: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.gate_proj, self.up_proj, self.down_proj = stacked_experts(
        n, d, f, std=std, param_dtype=param_dtype, rngs=rngs)


class MoE(nnx.Module):
  """Router + E stacked SwiGLU experts [E, D, F] / [E, F, D] (+ shared experts). `m` is the model
  config section; model.moe holds the MoE keys."""

  def __init__(self, m: mlc.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs,
               gru: routers.GRUCell | None = None, pool: ExpertPool | None = None,
               member: int = 0, layer: int = 0):
    c = m.moe
    e, d, f = num_candidates(m), m.d_model, expert_d_ff(m)
    self.iterations, self.shared_router = c.iterations, c.coe_shared_router
    if c.router == "gru":  # RMoE: `gru` is the model's one cell (RoutedFFNs); C = 1 (config.py)
      self.router = routers.RecurrentRouter(d, c.gru_dim, e, gru, recurrence=c.gru_recurrence,
                                            std=m.init_std, param_dtype=param_dtype, rngs=rngs)
    else:  # linear, or mlp with hidden width router_mlp_dim (one network per CoE iteration)
      self.router = routers.Router(1 if c.coe_shared_router else c.iterations, d, e, c.router,
                                   std=m.init_std, param_dtype=param_dtype, rngs=rngs,
                                   hidden=router_mlp_dim(m) if c.router == "mlp" else None)
    self.pool = pool  # ReXMoE: the group's experts; else the layer's own below
    if pool is None:
      self.gate_proj, self.up_proj, self.down_proj = stacked_experts(
          e, d, f, std=m.init_std, param_dtype=param_dtype, rngs=rngs)
    self.member, self.layer = member, layer
    self.router_out, self.group = e, c.rex_group
    self.psr = (dict(start=c.psr_start, end=c.psr_end, first=psr_first(m),
                     schedule=c.psr_schedule) if psr_applies(m) else None)
    self.shared = (SwiGLU(d, f * c.num_shared_experts, std=m.init_std, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs) if c.num_shared_experts else None)
    self.dtype = dtype
    self.top_k, self.score, self.renormalize = c.top_k, c.score, c.renormalize
    self.capacity_factor, self.impl = c.capacity_factor, c.impl
    self.gmm = c.gmm
    self.balance_coeff, self.z_coeff = c.balance_coeff, c.z_coeff
    self.balance_scope, self.balance_form = c.balance_scope, c.balance_form
    self.inner_residual = c.coe_residual in ("inner", "inner_outer")
    self.outer_residual = c.coe_residual in ("outer", "inner_outer")  # read by Block

  def route(self, x_BTD: Array, valid_BT: Array, t: int = 0, *, logits_BTE: Array | None = None,
            keep_E: Array | None = None) -> Routing:
    """Router logits, top-k gates and the capacity mask of the valid (non-padding) tokens, by the
    router of iteration t (CoE: e_t of spec §2.1; router 0 for all t with coe_shared_router).
    `logits_BTE` replaces the linear router's (RMoE's recurrent router, `forward`); scores are 0
    where `keep_E` is False (the PSR mask, `psr_mask`), before the top-k."""
    if logits_BTE is None:
      logits_BTE = self.router(x_BTD, 0 if self.shared_router else t)
    scores_BTE = routing.expert_scores(logits_BTE, self.score)
    if keep_E is not None:
      scores_BTE = jnp.where(keep_E, scores_BTE, 0.0)
    w_BTK, e_BTK = routing.top_experts(scores_BTE, self.top_k, self.renormalize)
    if self.capacity_factor > 0:
      num_experts = logits_BTE.shape[-1]
      cap = routing.expert_capacity(x_BTD.shape[1], self.top_k, num_experts, self.capacity_factor)
      keep_BTK = routing.within_capacity(e_BTK, valid_BT, num_experts, cap)
    else:
      keep_BTK = jnp.ones(e_BTK.shape, bool)
    return Routing(logits_BTE, jnp.where(keep_BTK, w_BTK, 0.0), e_BTK, keep_BTK)

  def routed_experts(self, x_BTD: Array, r: Routing) -> Array:
    """sum_i w_i E_{e_i}(x) through the configured implementation."""
    own = self if self.pool is None else self.pool
    weights = (own.gate_proj[...], own.up_proj[...], own.down_proj[...])
    if expert_parallel.axis_size() > 1:  # experts sharded over the mesh axis `expert`
      if self.impl != "ragged":
        raise ValueError(f"expert parallelism runs the ragged path, not impl={self.impl!r}")
      cap = (routing.expert_capacity(x_BTD.shape[1], self.top_k, self.router_out,
                                     self.capacity_factor) if self.capacity_factor > 0 else None)
      return expert_parallel.routed_experts(
          x_BTD, *(w.astype(self.dtype) for w in weights), r.weights, r.experts, r.keep,
          gmm=self.gmm, capacity=cap)
    kernel = {"gmm": self.gmm} if self.impl == "ragged" else {}
    return IMPLS[self.impl](x_BTD, *(w.astype(self.dtype) for w in weights), r, **kernel)

  def __call__(self, x_BTD: Array, valid_BT: Array | None = None) -> tuple[Array, dict]:
    """(y_BTD, aux); `valid_BT` False at padding, which takes no capacity and no statistics.
    With C = 1 and no inner residual, y = MoE(x)."""
    return self.forward(x_BTD, valid_BT)[:2]

  def forward(self, x_BTD: Array, valid_BT: Array | None = None, carry: Carry = NO_CARRY
              ) -> tuple[Array, dict, Carry]:
    """(y_BTD, aux, carry): a recurrent router reads h_{i-1} from the carry and puts h_i there;
    a linear one passes the carry on. The CoE chain (`iterate`) of C >= 1 iterations."""
    if valid_BT is None:
      valid_BT = jnp.ones(x_BTD.shape[:2], bool)
    logits_BTE = None
    if isinstance(self.router, routers.RecurrentRouter):  # C = 1 (config.py)
      logits_BTE, h_BTP = self.router(x_BTD, carry.router)
      carry = carry._replace(router=h_BTP)
    keep_E = None if self.psr is None or carry.step is None else self.psr_mask(carry.step)
    y_BTD, rs = self.iterate(x_BTD, valid_BT, logits_BTE=logits_BTE, keep_E=keep_E)
    return y_BTD, iteration_aux([self.aux(r, valid_BT) for r in rs]), carry

  def iterate(self, x_BTD: Array, valid_BT: Array, *, logits_BTE: Array | None = None,
              keep_E: Array | None = None) -> tuple[Array, list[Routing]]:
    """x^(C) of the chain x^(t) = [x^(t-1) +] MoE_t(x^(t-1)) (CoE, spec §2.1; the bracket with
    the inner residual) and the routing of each iteration; `logits_BTE` (RMoE, C = 1) and
    `keep_E` (the PSR mask, the same at every iteration) as in `route`."""
    rs = []
    for t in range(self.iterations):
      r = self.route(x_BTD, valid_BT, t, logits_BTE=logits_BTE, keep_E=keep_E)
      y_BTD = self.routed_experts(x_BTD, r)
      if self.shared is not None:  # every iteration, on x^(t-1) (the official CoeMoE.forward)
        y_BTD = y_BTD + self.shared(x_BTD)
      y_BTD = y_BTD.astype(x_BTD.dtype)
      x_BTD = x_BTD + y_BTD if self.inner_residual else y_BTD
      rs.append(r)
    return x_BTD, rs

  def psr_mask(self, step: Array) -> Array:
    """PSR at optimizer step `step`: N_t of the r E candidates routable (Eq. 6 or stepwise,
    routing.psr_num_candidates), the layer's own first (routing.psr_mask)."""
    e = self.router_out // self.group
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(PSR_SEED), step), self.layer)
    p = self.psr
    kept = routing.psr_num_candidates(step, e, self.group, p["start"], p["end"],
                                      first=p["first"], schedule=p["schedule"])
    return routing.psr_mask(key, kept, e, self.member, self.group)

  def aux(self, r: Routing, valid_BT: Array) -> dict:
    """Losses (weighted) and statistics of one application (module docstring)."""
    num_experts = r.logits.shape[-1]
    probs_BTE = routing.expert_scores(r.logits, self.score)
    probs_BTE = probs_BTE / jnp.sum(probs_BTE, axis=-1, keepdims=True)  # sigmoid: DeepSeek-V3
    if self.balance_scope == "sequence":
      balance = routing.sequence_balancing_loss(probs_BTE, r.experts, valid_BT)
    else:
      balance = routing.balancing_loss(probs_BTE, r.experts, valid_BT)
    z = routing.z_loss(r.logits, valid_BT)
    load_E = routing.load(r.experts, valid_BT, num_experts)
    assigned_BTK = jnp.broadcast_to(valid_BT[..., None], r.keep.shape)
    dropped = jnp.sum(assigned_BTK & ~r.keep) / jnp.maximum(jnp.sum(assigned_BTK), 1)
    out = {"loss/moe_balance": self.balance_coeff * balance, "loss/moe_z": self.z_coeff * z,
           "moe/balance": balance, "moe/z": z, "moe/load": load_E,
           "moe/max_violation": routing.max_violation(load_E), "moe/dropped": dropped,
           "moe/layers": jnp.ones((), jnp.float32)}
    if self.balance_form == "mixtral":  # pooled over layers by aux.mean_over_layers
      del out["loss/moe_balance"]
      out.update(aux_lib.pool_statistics(probs_BTE, r.experts, valid_BT, self.balance_coeff))
    return out


class RoutedFFNs:
  """Builds the FFN of each unique layer, in layer order (None: the dense SwiGLU), with what the
  routed ones share, each made with the first layer that needs it and held by every user (one
  parameter, its gradients summed over the layers): RMoE's GRU cell, one per model; ReXMoE's
  ExpertPool, one per group of r consecutive MoE layers."""

  def __init__(self, m: mlc.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.m, self.kw = m, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gru, self.pool, self.built = None, None, 0

  def __call__(self, layer: int) -> MoE | None:
    if not is_moe_layer(self.m, layer):
      return None
    m, c, kw = self.m, self.m.moe, self.kw
    if c.router == "gru" and self.gru is None:
      self.gru = routers.GRUCell(c.gru_dim, param_dtype=kw["param_dtype"], rngs=kw["rngs"])
    member = self.built % c.rex_group
    self.built += 1
    if c.rex_group == 1:  # `layer` keys the PSR mask of the R1 control
      return MoE(m, **kw, gru=self.gru, layer=layer)
    if member == 0:
      self.pool = ExpertPool(num_candidates(m), m.d_model, expert_d_ff(m), std=m.init_std,
                             param_dtype=kw["param_dtype"], rngs=kw["rngs"])
    return MoE(m, **kw, gru=self.gru, pool=self.pool, member=member, layer=layer)


def uses_step(m: mlc.ConfigDict) -> bool:
  """Whether a routed layer reads the optimizer step from the carry (PSR)."""
  return psr_applies(m)


def iteration_aux(gate_calls: list[dict]) -> dict:
  """One layer's aux from the aux of its C gate calls (CoE): the losses summed, as the official
  code adds the loss of every gate call (spec §2.1), the statistics averaged ("moe/layers" = 1)."""
  total = aux_lib.add_aux(gate_calls)
  return {k: v if k.startswith("loss/") else v / len(gate_calls) for k, v in total.items()}
