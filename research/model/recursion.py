"""Layer tying: which shared layer each unrolled depth runs, and the relaxed (LoRA) core.

Sharing strategies (MoR paper Table 5; docs/methods/mor.md §1.2), unrolled depth l in [0, L):
  cycle            B = L/Nr shared layers, depth l uses layer l mod B    [(0,1,2),(0,1,2)]
  sequence         B = L/Nr, depth l uses layer floor(l / Nr)           [(0,0),(1,1),(2,2)]
  middle_cycle     first and last layers unique; the L-2 middle depths cycle over (L-2)/Nr layers
  middle_sequence  first and last layers unique; the middle depths follow the sequence rule

Relaxed Recursive Transformer (Bae et al. 2024, Eq. 3): every shared linear map W' gets one LoRA
per unrolled depth l, h = W' x + B_l A_l x (scale 1), so rank 0 is the plain recursive model and
full rank can reproduce any untied model.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research.model import aux as aux_lib
from research.model import early_exit, moe, mor, routed
from research.model.layers import NO_CARRY, SELF_ATTENTION, Carry, LoRA, Site, Tokens

Array = jax.Array
SITE = "core"  # decode-cache site names of the core: core/<depth>

STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """prelude unique layers -> shared layers in `order` (one entry per middle depth) -> coda."""

  prelude: int
  num_shared: int
  order: tuple[int, ...]  # shared-layer index of each middle depth
  coda: int
  num_recursions: int

  @property
  def num_layers(self) -> int:
    return self.prelude + len(self.order) + self.coda

  def source_depths(self, j: int) -> list[int]:
    """Unrolled depths (0-based, whole model) that run shared layer j (its tie group)."""
    return [self.prelude + d for d, k in enumerate(self.order) if k == j]


def nearest_valid_depths(num_layers: int, nr: int, fixed: int) -> str:
  """The closest depths around num_layers with L - fixed a positive multiple of nr."""
  k = (num_layers - fixed) // nr
  above = fixed + nr * (k + 1)
  return f"{fixed + nr * k} or {above}" if k >= 1 else f"{above}"


def make_plan(strategy: str, num_layers: int, num_recursions: int) -> LayerPlan:
  """The layer plan of `strategy`; ValueError naming valid depths when L does not divide."""
  if strategy not in STRATEGIES:
    raise ValueError(f"config.model.recursion.strategy={strategy!r}: choose one of {STRATEGIES}")
  nr = num_recursions
  if strategy == "none":
    if nr != 1:
      raise ValueError(f"config.model.recursion.num_recursions={nr}: needs a sharing strategy "
                       "(config.model.recursion.strategy is 'none')")
    return LayerPlan(0, num_layers, tuple(range(num_layers)), 0, 1)
  if nr < 1:
    raise ValueError(f"config.model.recursion.num_recursions={nr}: must be >= 1")
  fixed = 2 if strategy.startswith("middle") else 0
  middle = num_layers - fixed
  if middle < nr or middle % nr:
    what = "num_layers - 2" if fixed else "num_layers"
    raise ValueError(
        f"config.model.num_layers={num_layers}: {what} must be a positive multiple of "
        f"config.model.recursion.num_recursions={nr} for {strategy}; nearest valid depths: "
        f"{nearest_valid_depths(num_layers, nr, fixed)}")
  base = middle // nr
  if strategy.endswith("cycle"):
    order = tuple(j for _ in range(nr) for j in range(base))
  else:
    order = tuple(j for j in range(base) for _ in range(nr))
  return LayerPlan(fixed // 2, base, order, fixed // 2, nr)


LORA_KINDS = {  # projection -> (rank key, input width key, output width key)
    "q_proj": ("lora_rank_q", "d_model", "q_width"),
    "k_proj": ("lora_rank_kv", "d_model", "kv_width"),
    "v_proj": ("lora_rank_kv", "d_model", "kv_width"),
    "o_proj": ("lora_rank_o", "q_width", "d_model"),
    "gate_proj": ("lora_rank_ffn", "d_model", "d_ff"),
    "up_proj": ("lora_rank_ffn", "d_model", "d_ff"),
    "down_proj": ("lora_rank_ffn", "d_ff", "d_model"),
}


def lora_shapes(m: mlc.ConfigDict) -> dict[str, tuple[int, int, int]]:
  """projection -> (in, rank, out) with rank capped at min(in, out); rank-0 entries dropped."""
  widths = dict(d_model=m.d_model, d_ff=m.d_ff, q_width=m.num_heads * m.head_dim,
                kv_width=m.num_kv_heads * m.head_dim)
  r = m.recursion
  shapes = {}
  for name, (rank_key, din, dout) in LORA_KINDS.items():
    rank = r.lora_rank if r[rank_key] == -1 else r[rank_key]
    rank = min(rank, widths[din], widths[dout])
    if rank > 0:
      shapes[name] = (widths[din], rank, widths[dout])
  return shapes


class DepthLoRA(nnx.Module):
  """Per-depth LoRA factors stacked on a leading depth axis: A [N, in, r], B [N, r, out].

  Standard LoRA init (A ~ N(0, 1/in), B = 0), so a fresh relaxed model equals the recursive
  one; the pretrained-conversion path overwrites both with truncated-SVD factors.
  """

  def __init__(self, shapes: dict[str, tuple[int, int, int]], depths: int, *, param_dtype,
               rngs: nnx.Rngs):
    for name, (din, rank, dout) in shapes.items():
      a_init = nnx.with_partitioning(nnx.initializers.normal(din**-0.5), (None, "embed", None))
      b_init = nnx.with_partitioning(nnx.initializers.zeros, (None, None, "embed"))
      setattr(self, f"{name}_a", nnx.Param(a_init(rngs.params(), (depths, din, rank),
                                                  param_dtype)))
      setattr(self, f"{name}_b", nnx.Param(b_init(rngs.params(), (depths, rank, dout),
                                                  param_dtype)))
    self.names = tuple(shapes)

  def at(self, depth: int) -> LoRA:
    return {n: (getattr(self, f"{n}_a")[depth], getattr(self, f"{n}_b")[depth])
            for n in self.names}

  def merged(self, depths: list[int], choice_B: Array) -> LoRA:
    """The LoRAs of `depths` as one rank-(n r) LoRA, row b using only depths[choice_B[b]].

    RRT App. K: merging a shared layer's per-loop LoRAs lets one batch hold samples at different
    loops (depth-wise batching), at n times the LoRA FLOPs. A = [A_d1 .. A_dn] [in, n r],
    B = [B_d1; ..; B_dn] [n r, out], gate[b, i] = 1 where component i belongs to row b's depth.
    """
    lora, idx = {}, jnp.asarray(depths, jnp.int32)
    for n in self.names:
      a_NIR, b_NRO = getattr(self, f"{n}_a")[...][idx], getattr(self, f"{n}_b")[...][idx]
      num, din, rank = a_NIR.shape
      gate_BM = (jnp.arange(num * rank) // rank)[None, :] == choice_B[:, None]
      lora[n] = (jnp.moveaxis(a_NIR, 0, 1).reshape(din, num * rank),
                 b_NRO.reshape(num * rank, -1), gate_BM)
    return lora


class Recursion(nnx.Module):
  """The one recursion core: the shared blocks run in plan order, each depth with its own LoRA
  and norms, and optionally a MoR routing rule deciding which tokens run each recursion step.

  A plain stack (strategy "none": every depth its own block) and the tied cores are this one
  class; with `rule` (mor.ExpertChoice | mor.TokenChoice, or early_exit.ConfidenceExit when
  decoding a model with per-loop exits) a step r (the num_shared depths of loop r) runs through
  routed.py on the tokens the rule selects. The rule's networks are the
  core's attributes `router`, `aux_router`, `bias`, `counter` (None when absent).
  With `recursion.lora_merged`, each loop runs through `loop_step` with the merged per-loop
  LoRAs (same outputs, the form that batches samples at different loops; cycle plans only).
  """

  def __init__(self, plan: LayerPlan, blocks: list[nnx.Module], m: mlc.ConfigDict, *,
               remat: bool, param_dtype, rngs: nnx.Rngs):
    self.plan = plan
    self.blocks = nnx.List(blocks)
    self.remat = remat
    self.merged = m.recursion.lora_merged
    depths = len(plan.order)
    shapes = lora_shapes(m) if m.recursion.strategy != "none" else {}
    self.lora = DepthLoRA(shapes, depths, param_dtype=param_dtype, rngs=rngs) if shapes else None
    if m.recursion.share_norms:
      self.attn_norms = self.ffn_norms = None
    else:  # untied norms: one scale per unrolled depth, initialised to 1 like RMSNorm
      init = nnx.with_partitioning(nnx.initializers.ones, (None, "norm"))
      self.attn_norms = nnx.Param(init(rngs.params(), (depths, m.d_model), param_dtype))
      self.ffn_norms = nnx.Param(init(rngs.params(), (depths, m.d_model), param_dtype))
    self.rule = mor.make_rule(m) or early_exit.make_rule(m)
    for name, module in mor.build_router(m, param_dtype=param_dtype, rngs=rngs).items():
      setattr(self, name, module)
    self.kv_mode = m.mor.kv if m.mor.kind != "none" else "cache"

  def __call__(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict]:
    return self.forward(x_BTD, tok)[:2]

  def forward(self, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY,
              head: Callable[[Array], Array] | None = None) -> tuple[Array, dict, Carry]:
    """(output, aux summed over depths, carry): the carry runs through every depth in order, so a
    recurrent router's state goes on when a shared MoE layer runs again (layers.Carry). A rule
    (MoR, or early_exit's, which reads the model's exit `head`) adds its statistics, losses and
    decisions (aux "route/...", mor.routes) to the aux."""
    if self.rule is not None:
      return self.rule(self, x_BTD, tok, carry, head)
    outs, aux, carry = self.loop_outputs(x_BTD, tok, carry)
    return outs[-1], aux, carry

  def loop_outputs(self, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY
                   ) -> tuple[list[Array], dict, Carry]:
    """The hidden state after each loop over the shared layers (RRT §2.4 early exits), the last
    one being the core's output, the blocks' aux summed over depths (aux.add_aux) and the carry.
    A loop is num_shared consecutive depths (cycle plans)."""
    outs = []
    if self.merged:
      for loop in range(self.plan.num_recursions):
        x_BTD, carry = self.loop_step(x_BTD, tok, jnp.full((x_BTD.shape[0],), loop, jnp.int32),
                                      carry, loop=loop)
        outs.append(x_BTD)
      return outs, {}, carry
    auxes = []
    for depth in range(len(self.plan.order)):
      x_BTD, aux, carry = self.step(depth, x_BTD, tok, carry)
      auxes.append(aux)
      if (depth + 1) % self.plan.num_shared == 0:
        outs.append(x_BTD)
    return outs, aux_lib.add_aux(auxes), carry

  def run_step(self, r: int, x_BTD: Array, tok: Tokens, slots: routed.Slots, carry: Carry,
               gate_BK: Array | None = None, *, mode: str,
               then: Callable[[Array, Array], Array] | None = None
               ) -> tuple[Array, tuple[dict, Carry]]:
    """Recursion step r (its num_shared depths) on the tokens of `slots` only, through
    routed.routed_apply: the slots' tokens are gathered with their metadata (spare slots marked
    as padding, so nobody attends to them) and their recurrent-router state, the depths run on
    them, `then(x_K, y_K)` makes the slots' results (default: the depths' output) and these go
    back scattered with `gate_BK` by `mode` (routed.scatter). Returns x and (aux, carry)."""
    b = self.plan.num_shared

    def compute(x_BKD: Array) -> tuple[Array, tuple[dict, Carry]]:
      tok_K = tok if slots.idx is None else tok.take(slots.idx)
      tok_K = tok_K._replace(segments=jnp.where(slots.valid, tok_K.segments, 0))
      inner = carry if carry.router is None else carry._replace(
          router=routed.gather(carry.router, slots))
      y_BKD, auxes = x_BKD, []
      for depth in range(r * b, (r + 1) * b):
        y_BKD, aux, inner = self.step(depth, y_BKD, tok_K, inner)
        auxes.append(aux)
      return (y_BKD if then is None else then(x_BKD, y_BKD)), (aux_lib.add_aux(auxes), inner)

    x_BTD, (aux, inner) = routed.routed_apply(x_BTD, slots, compute, gate_BK, mode)
    if carry.router is not None:
      inner = inner._replace(router=routed.scatter(carry.router, inner.router, slots, mode="set"))
    return x_BTD, (aux, inner)

  def at_depth(self, depth: int) -> tuple[nnx.Module, LoRA | None, tuple[Array, Array] | None]:
    """(shared block, LoRA, (attn, ffn) norm scales) of core depth `depth` (per-depth LoRA)."""
    lora = None if self.lora is None else self.lora.at(depth)
    norms = None if self.attn_norms is None else (self.attn_norms[depth], self.ffn_norms[depth])
    return self.blocks[self.plan.order[depth]], lora, norms

  def site(self, depth: int) -> Site:
    """The stored K/V the attention at core depth `depth` writes and reads (layers.Site): its own
    decode-cache entry "core/<depth>"; with MoR KV sharing, the depths of step 1 keep theirs and
    later steps read those of the same position in the step (share_update: with their fresh K/V
    on top, cached per depth when decoding)."""
    name, b = f"{SITE}/{depth}", self.plan.num_shared
    if self.kv_mode == "cache":
      return Site(name)
    if depth < b:
      return Site(name, keep=True)
    shared = f"{SITE}/{depth % b}"
    return Site(name, shared, update=True) if self.kv_mode == "share_update" else Site(
        shared=shared)

  def sites(self) -> list[str]:
    """The names of the decode-cache entries this core writes (site)."""
    return [s.name for s in map(self.site, range(len(self.plan.order)))
            if s.name is not None]

  def loop_step(self, x_BTD: Array, tok: Tokens, loop_B: Array, carry: Carry = NO_CARRY, *,
                loop: int | None = None, sites: Sequence[Site] | None = None
                ) -> tuple[Array, Carry]:
    """One pass over the shared layers, row b at loop loop_B[b] (its LoRAs and norms): the
    step of continuous depth-wise batching (RRT §2.4, App. K), merged LoRAs. Cycle plans. The
    attention of shared layer j uses sites[j] when given (the depth-wise engine's gathered
    rows), else that loop's cache sites with `loop` (every row at that loop), else plain
    self-attention."""
    for j in range(self.plan.num_shared):
      depths = [d for d, k in enumerate(self.plan.order) if k == j]  # loop b -> depths[b]
      lora = None if self.lora is None else self.lora.merged(depths, loop_B)
      norms = None
      if self.attn_norms is not None:
        depth_B = jnp.asarray(depths, jnp.int32)[loop_B]
        norms = (self.attn_norms[...][depth_B], self.ffn_norms[...][depth_B])
      if sites is not None:
        site = sites[j]
      else:
        site = SELF_ATTENTION if loop is None else self.site(depths[loop])
      x_BTD, _, carry = self.call(self.blocks[j], x_BTD, tok, lora, norms, site, carry)
    return x_BTD, carry

  def step(self, depth: int, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY
           ) -> tuple[Array, dict, Carry]:
    """Core depth `depth` (its block, LoRA, norms and site) on x."""
    block, lora, norms = self.at_depth(depth)
    return self.call(block, x_BTD, tok, lora, norms, self.site(depth), carry)

  def call(self, block, x_BTD, tok, lora, norms, site: Site, carry: Carry
           ) -> tuple[Array, dict, Carry]:
    """block.forward, rematerialised in the backward pass when `remat`."""
    fn = lambda blk, x, t, lo, no, c: blk.forward(x, t, lo, no, site=site, carry=c)
    return (nnx.remat(fn) if self.remat else fn)(block, x_BTD, tok, lora, norms, carry)


def non_embedding_params(m: mlc.ConfigDict) -> int:
  """Unique non-embedding parameters: prelude + shared + coda layers (a routed FFN: its router, one
  per CoE iteration unless shared, all E experts and the shared ones; RMoE's one GRU cell), LoRAs,
  untied/final norms.

  Reproduces the papers' counts (tested): MoR 360M middle-cycle Nr=2/3/4 = 167M/118M/98M, RRT
  Gemma-2B cycle B=2 with ranks 64..512 = 1.07/1.15/1.30/1.60B.
  """
  head_dim = m.head_dim if m.head_dim > 0 else m.d_model // m.num_heads
  d, c = m.d_model, m.moe
  layer = d * head_dim * 2 * (m.num_heads + m.num_kv_heads) + 2 * d
  routed_ffn = moe.router_params(m) + 3 * d * moe.expert_d_ff(m) * (c.num_experts
                                                                    + c.num_shared_experts)
  plan = make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  unique_layers = plan.prelude + plan.num_shared + plan.coda
  depths = len(plan.order) if m.recursion.strategy != "none" else 0
  total = d + moe.shared_router_params(m) + sum(  # + final norm, RMoE's GRU
      layer + (routed_ffn if moe.is_moe_layer(m, i) else 3 * d * m.d_ff)
      for i in range(unique_layers))
  if depths:
    shapes = lora_shapes(mlc.ConfigDict(dict(m.to_dict(), head_dim=head_dim)))
    total += depths * sum(r * (i + o) for i, r, o in shapes.values())
    if not m.recursion.share_norms:
      total += depths * 2 * d
  return total

