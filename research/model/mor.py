"""Mixture-of-Recursions core (Bae et al. 2025, arXiv 2507.10524; shared/specs/mor.md §2-3).

The tied recursion of recursion.py (cycle / middle-cycle plans, the same Block modules at every
step) with routers that decide each token's number of recursion steps. One execution path,
select -> gather -> compute -> scatter with gate:

  expert choice (§2.2)  step r: router r scores the tokens that ran step r-1 (S_{r-1}); the top
      k_r = max(1, floor(c_r T)) of each row, sorted, form S_r; the B shared layers run on H[S_r]
      at their original positions; H[S_r] += g * f(H[S_r]), f = the layer stack with its residual
      (Eq. 2.1), g = alpha * sigmoid(s). Aux BCE pulls sigma(s) toward the top-k decision.
  token choice (§2.4)   one router on the stack input x1 picks depth d_t in 1..Nr (top-1);
      step r runs the tokens with d_t >= r; out_t = x1_t + g_t f^{d_t}(x1_t) (gate at exit, as in
      the code; "every" gates every step as Eq. 2.2 writes it).

`impl` "gather" runs the blocks on the selected tokens only (FLOPs saved); "masked" is the
full-length reference with the mask M_r[i, j] = [i, j in S_r and j <= i] (§3.1); both give the
same selected rows and leave the others bit-identical (tests/test_mor.py).

KV modes (§3): cache - step r attends among its own tokens (recursion-wise caching); share - step
r >= 2 attends to the keys/values all tokens produced at recursion 1 in the same block layer and
skips its K/V projections; share_update - share, with the step's tokens overwriting their own
entries by freshly computed K/V (Table 15's hybrid; expert choice only).

Non-trainable state (loss-free bias, warm-up counter) leaves the forward as aux["update/<path>"]
values; research/train/step.py writes them back after the optimizer step.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research import routing
from research.model import routers
from research.model.layers import (
    Block,
    Tokens,
    apply_rope,
    attention_mask,
    constrain_activations,
    dot_product_attention,
)
from research.model.recursion import LayerPlan

Array = jax.Array
KV = tuple[Array, Array, Tokens]  # keys [B, S, K, Dh] with RoPE, values, their tokens' metadata
PATH = "core"  # the LanguageModel attribute holding this core (prefix of its update/ keys)
BINS = 10  # router-score histogram bins over [0, 1]


class Routes(NamedTuple):
  """Routing decisions of one forward, for tests and analysis.

  selected[r]: [B, T] bool, token ran step r. indices[r] / valid[r]: [B, K_r] the sorted row
  positions of step r's slots and whether a slot holds a selected token (empty for threshold
  routing, whose count is dynamic). depth: [B, T] steps run by each token.
  """

  selected: tuple[Array, ...]
  indices: tuple[Array, ...]
  valid: tuple[Array, ...]
  depth: Array


def kv_block(block: Block, x_BTD: Array, tok: Tokens, shared: KV | None = None,
             update: tuple[Array, Array] | None = None) -> tuple[Array, KV]:
  """block(x, tok) whose attention reads the keys/values `shared` when given (KV sharing, §3.2);
  returns the output and the K/V it attended to. `update` = (idx_BK, sel_BK): the selected
  tokens (at row positions idx) overwrite their shared K/V with their own (hybrid variant)."""
  attn = block.attn
  b, t, _ = x_BTD.shape
  heads, kv_heads, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
  h = block.attn_norm(x_BTD)
  q = apply_rope(attn.q_proj(h).reshape(b, t, heads, dh), tok.positions, attn.rope_theta)
  if shared is None or update is not None:
    k = apply_rope(attn.k_proj(h).reshape(b, t, kv_heads, dh), tok.positions, attn.rope_theta)
    v = attn.v_proj(h).reshape(b, t, kv_heads, dh)
  if shared is None:
    kv = (k, v, tok)
  elif update is None:
    kv = shared
  else:
    idx_BK, sel_BK = update
    sel = sel_BK[:, :, None, None]

    def overwrite(old, new):
      return routing.scatter_set_rows(old, idx_BK,
                                      jnp.where(sel, new, routing.gather_rows(old, idx_BK)))

    kv = (overwrite(shared[0], k), overwrite(shared[1], v), shared[2])
  mask = attention_mask(tok, kv[2], causal=True, cross_segments=attn.cross_segments)
  out = dot_product_attention(q, kv[0], kv[1], mask).reshape(b, t, heads * dh)
  x_BTD = x_BTD + attn.o_proj(out)
  return constrain_activations(x_BTD + block.ffn(block.ffn_norm(x_BTD))), kv


def capacities(m: mlc.ConfigDict) -> tuple[float, ...]:
  """model.mor.capacity, or the paper's default (Nr - r + 1) / Nr."""
  return tuple(m.mor.capacity) or routing.default_capacities(m.recursion.num_recursions)


def threshold_route(valid_BC: Array, rule_BC: Array, capacity: float) -> Array:
  """The causal inference rule (§2.5): a candidate runs the step iff sigma(rule) > 0.5, except
  that a step of capacity 1 passes every candidate."""
  return valid_BC & (rule_BC > 0) if capacity < 1 else valid_BC


def gated_add(x_BTD: Array, y_BTD: Array, w_BT: Array, sel_BT: Array) -> Array:
  """Expert-choice combine (Eq. 2.1): x + w f(x) for the selected tokens, x elsewhere."""
  return jnp.where(sel_BT[..., None], x_BTD + (w_BT[..., None] * y_BTD).astype(x_BTD.dtype), x_BTD)


def token_update(gate: str, r: int, x_BKD: Array, x1_BKD: Array, y_BKD: Array, w_BK: Array,
                 d_BK: Array, sel_BK: Array) -> Array:
  """Token-choice state after step r (§2.4 step 4): exiting tokens (depth r + 1) get
  x1 + w f, continuing ones f (gate 'every': w f); tokens outside the step keep x."""
  w_BK1 = w_BK[..., None]
  inner = w_BK1 * y_BKD if gate == "every" else y_BKD
  new_BKD = jnp.where(d_BK[..., None] == r + 1, x1_BKD + w_BK1 * y_BKD, inner)
  return jnp.where(sel_BK[..., None], new_BKD.astype(x_BKD.dtype), x_BKD)


def masked_tokens(tok: Tokens, keep: Array) -> Tokens:
  """tok with the tokens outside `keep` marked as padding: nobody attends to them."""
  return tok._replace(segments=jnp.where(keep, tok.segments, 0))


class MoR(nnx.Module):
  """The routed recursion core: `model.mor.kind` expert | token (see the module docstring)."""

  def __init__(self, plan: LayerPlan, blocks: list[nnx.Module], m: mlc.ConfigDict, *,
               remat: bool, param_dtype, rngs: nnx.Rngs):
    self.plan = plan
    self.blocks = nnx.List(blocks)
    self.remat = remat
    self.cfg = mlc.FrozenConfigDict(m.mor)
    self.capacity = capacities(m)
    nr, c = plan.num_recursions, self.cfg
    expert = c.kind == "expert"

    def router(num, out, **kw):
      return routers.Router(num, m.d_model, out, c.router, std=m.init_std,
                            param_dtype=param_dtype, rngs=rngs, **kw)

    self.router = router(nr, 1) if expert else router(1, nr)
    self.aux_router = (router(nr, 1, lr_mult=c.expert.aux_router_lr_mult)
                       if expert and c.expert.sampling == "aux_router" else None)
    self.bias = (routers.RouterBias(jnp.zeros((nr,), jnp.float32))
                 if not expert and c.token.balancing == "loss_free" else None)
    warmup = c.expert.cap_warmup_steps if expert else c.token.bal_warmup_steps
    self.counter = routers.Counter(jnp.zeros((), jnp.int32)) if warmup > 0 else None

  def __call__(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict]:
    x_BTD, aux, _ = self.forward(x_BTD, tok)
    return x_BTD, aux

  def forward(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict, Routes]:
    """(hidden states, aux, routes)."""
    if self.cfg.kind == "expert":
      x_BTD, aux, routes = self.expert_choice(x_BTD, tok)
    else:
      x_BTD, aux, routes = self.token_choice(x_BTD, tok)
    if self.counter is not None:
      aux[f"update/{PATH}/counter"] = self.counter[...] + 1
    if self.cfg.z_coeff > 0:
      aux["loss/mor_z"] = self.cfg.z_coeff * jnp.sum(aux["mor/z"])
    nr = self.plan.num_recursions
    valid_BT = tok.segments != 0
    aux["mor/depth_frac"] = routing.load(routes.depth, valid_BT, nr + 1)
    return x_BTD, aux, routes

  def call(self, fn, *args):
    """fn(*args), rematerialised in the backward pass when configured."""
    return nnx.remat(fn)(*args) if self.remat else fn(*args)

  def run_step(self, r: int, x_BKD: Array, tok: Tokens, shared: tuple[KV, ...] | None,
               slots: tuple[Array, Array]) -> tuple[Array, tuple[KV, ...] | None]:
    """The B shared layers of step r on tokens x (non-selected slots marked as padding in tok).

    `shared`: recursion 1's K/V per layer (None at step 1, and always in cache mode); returns the
    output and the K/V to share. `slots` = (row positions, selected) of x's tokens.
    """
    b = self.plan.num_shared
    layers = self.plan.order[r * b:(r + 1) * b]
    if self.cfg.kv == "cache":
      for j in layers:
        x_BKD = self.call(lambda blk, x, t: blk(x, t), self.blocks[j], x_BKD, tok)
      return x_BKD, None
    update = slots if self.cfg.kv == "share_update" and shared is not None else None
    produced = []
    for layer, j in enumerate(layers):
      prev = None if shared is None else shared[layer]
      x_BKD, kv = self.call(kv_block, self.blocks[j], x_BKD, tok, prev, update)
      produced.append(kv)
    return x_BKD, tuple(produced) if shared is None else shared

  def expert_choice(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict, Routes]:
    """§2.2: nested top-k over each row's tokens, one router per step."""
    c, e = self.cfg, self.cfg.expert
    b, t, _ = x_BTD.shape
    nr = self.plan.num_recursions
    gather = c.impl == "gather"
    ks = routing.tokens_per_step(self.capacity, t)
    live = [None] * nr
    if e.cap_warmup_steps > 0:  # capacities start at 1: no compaction while training
      live = [routing.live_tokens(routing.warmup_capacity(cap, self.counter[...],
                                                          e.cap_warmup_steps), t)
              for cap in self.capacity]
      ks = (t,) * nr
    rows_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    idx_BC, valid_BC = rows_BT, tok.segments != 0  # candidates S_0: every real token
    depth_BT = jnp.zeros((b, t), jnp.int32)
    shared, stats, selected, indices, valids = None, [], [], [], []
    for r in range(nr):
      full = idx_BC.shape[1] == t  # candidates are the whole row in order
      x_BCD = x_BTD if full else routing.gather_rows(x_BTD, idx_BC)
      s_BC, g_BC, rule_BC, w_BC = self.expert_scores(x_BCD, r)
      if e.route == "threshold":
        target_BC = threshold_route(valid_BC, rule_BC, self.capacity[r])
      else:
        loc_BK, sel_BK, target_BC = routing.select_topk(g_BC, valid_BC, ks[r], live[r])
      if gather:
        idx_BK = routing.gather_rows(idx_BC, loc_BK)
        w_BK = routing.gather_rows(w_BC, loc_BK)
        in_place = ks[r] == t  # the slots are the whole row in order
        x_BKD = x_BTD if in_place else routing.gather_rows(x_BTD, idx_BK)
        tok_K = masked_tokens(tok if in_place else tok.take(idx_BK), sel_BK)
        y_BKD, shared = self.run_step(r, x_BKD, tok_K, shared, (idx_BK, sel_BK))
        if in_place:
          x_BTD = gated_add(x_BTD, y_BKD, w_BK, sel_BK)
        else:
          upd_BKD = (w_BK[..., None] * y_BKD).astype(x_BTD.dtype)
          x_BTD = routing.scatter_add_rows(x_BTD, idx_BK, jnp.where(sel_BK[..., None], upd_BKD, 0))
        sel_BT = jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], idx_BK].set(sel_BK)
        indices.append(idx_BK)
        valids.append(sel_BK)
        next_idx, next_valid = idx_BK, sel_BK
      else:  # masked reference: full length, candidates = row positions
        sel_BT = target_BC
        y_BTD, shared = self.run_step(r, x_BTD, masked_tokens(tok, sel_BT), shared,
                                      (rows_BT, sel_BT))
        x_BTD = gated_add(x_BTD, y_BTD, w_BC, sel_BT)
        if e.route != "threshold":
          indices.append(loc_BK)
          valids.append(sel_BK)
        next_idx, next_valid = rows_BT, sel_BT
      stats.append(self.expert_stats(s_BC, rule_BC, target_BC, valid_BC))
      selected.append(sel_BT)
      depth_BT += sel_BT
      idx_BC, valid_BC = next_idx, next_valid
    aux = {k: jnp.stack([st[k] for st in stats]) for k in stats[0]}
    if self.aux_router is None:
      aux["loss/mor_bce"] = e.aux_coeff * jnp.sum(aux["mor/bce"])
    else:
      aux["loss/mor_aux_router"] = jnp.sum(aux["mor/bce"])
    return x_BTD, aux, Routes(tuple(selected), tuple(indices), tuple(valids), depth_BT)

  def expert_scores(self, x_BCD: Array, r: int) -> tuple[Array, Array, Array, Array]:
    """§2.2 step 2 for step r's candidates: router logits s, gate g = alpha func(s), the logits
    of the causal rule sigma > 0.5 (the aux router's when there is one) and the combine weight
    (g, or 1 for additive gating)."""
    c, e = self.cfg, self.cfg.expert
    s_BC = self.router(x_BCD / c.temp, r)[..., 0]
    g_BC = routing.expert_gate(s_BC, e.func, e.alpha)
    rule_BC = (s_BC if self.aux_router is None
               else self.aux_router(jax.lax.stop_gradient(x_BCD) / c.temp, r)[..., 0])
    w_BC = g_BC if e.gating == "weighted" else jnp.ones_like(g_BC)
    return s_BC, g_BC, rule_BC, w_BC

  def expert_stats(self, s_BC, rule_BC, target_BC, valid_BC) -> dict[str, Array]:
    """One step's BCE (of the aux router when there is one), z-loss, threshold accuracy and
    sigma(s) histograms of the selected and the passed-over candidates (Fig. 5b)."""
    p_BC = jax.nn.sigmoid(rule_BC)
    return {
        "mor/bce": routing.bce_loss(rule_BC, target_BC, valid_BC),
        "mor/z": routing.z_loss(s_BC[..., None], valid_BC),
        "mor/threshold_acc": routing.threshold_accuracy(rule_BC, target_BC, valid_BC),
        "mor/hist_selected": routing.histogram(p_BC, valid_BC & target_BC, BINS),
        "mor/hist_unselected": routing.histogram(p_BC, valid_BC & ~target_BC, BINS),
    }

  def token_choice(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict, Routes]:
    """§2.4: one router picks each token's depth; step r runs the tokens with depth >= r."""
    c, tc = self.cfg, self.cfg.token
    b, t, _ = x_BTD.shape
    nr = self.plan.num_recursions
    valid_BT = tok.segments != 0
    logits_BTN, probs_BTN, choice_BT, gate_BT = self.token_route(x_BTD)
    buffers = routing.token_buffers(nr, t, tc.capacity_factor)
    depth_BT = jnp.where(valid_BT, choice_BT + 1, 0)
    if min(buffers) < t:
      depth_BT = routing.capped_depths(depth_BT, buffers)
    x1_BTD, state_BTD = x_BTD, x_BTD
    rows_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    shared, selected, indices, valids = None, [], [], []
    for r in range(nr):
      active_BT = depth_BT >= r + 1
      if c.impl == "gather" and buffers[r] < t:
        idx_BK, sel_BK = routing.first_come(active_BT, buffers[r])
        indices.append(idx_BK)
        valids.append(sel_BK)
      else:  # the whole row in place: masked reference, or a buffer that holds every token
        idx_BK, sel_BK = rows_BT, active_BT
      in_place = idx_BK.shape[1] == t
      x_BKD, x1_BKD, w_BK, d_BK, tok_K = (
          (state_BTD, x1_BTD, gate_BT, depth_BT, tok) if in_place else
          (*(routing.gather_rows(a, idx_BK) for a in (state_BTD, x1_BTD, gate_BT, depth_BT)),
           tok.take(idx_BK)))
      y_BKD, shared = self.run_step(r, x_BKD, masked_tokens(tok_K, sel_BK), shared,
                                    (idx_BK, sel_BK))
      new_BKD = token_update(tc.gate, r, x_BKD, x1_BKD, y_BKD, w_BK, d_BK, sel_BK)
      state_BTD = new_BKD if in_place else routing.scatter_set_rows(state_BTD, idx_BK, new_BKD)
      selected.append(active_BT)
    load_N = routing.load(choice_BT, valid_BT, nr)
    aux = {
        "mor/z": routing.z_loss(logits_BTN, valid_BT),
        "mor/balance": routing.balancing_loss(probs_BTN, choice_BT, valid_BT),
        "mor/load": load_N,
        "mor/maxvio": routing.max_violation(load_N),
        "mor/entropy": routing.mean_prob_entropy(probs_BTN, valid_BT),
        "mor/hist_gate": routing.histogram(gate_BT / tc.alpha, valid_BT, BINS),
    }
    if tc.balancing == "loss":
      aux["loss/mor_balance"] = tc.bal_coeff * aux["mor/balance"]
    if self.bias is not None:
      new_bias = routing.loss_free_bias(self.bias[...], load_N, tc.bias_rate)
      if self.counter is not None:
        new_bias = jnp.where(self.warming(), 0.0, new_bias)
      aux[f"update/{PATH}/bias"] = new_bias
    return state_BTD, aux, Routes(tuple(selected), tuple(indices), tuple(valids), depth_BT)

  def token_route(self, x1_BTD: Array) -> tuple[Array, Array, Array, Array]:
    """§2.4 steps 1-2 on the core input x1: router logits, p, the top-1 depth index (argmax of
    p + bias; Nr - 1 for every token during the balance warm-up) and its gate p[choice]."""
    tc, nr = self.cfg.token, self.plan.num_recursions
    logits_BTN = self.router(x1_BTD / self.cfg.temp, 0)
    probs_BTN = routing.token_probs(logits_BTN, tc.func, tc.alpha)
    bias_N = jnp.zeros((nr,), jnp.float32) if self.bias is None else self.bias[...]
    choice_BT = routing.top1_depth(probs_BTN, bias_N)
    if self.counter is not None:  # balance warm-up: everyone runs every step
      choice_BT = jnp.where(self.warming(), nr - 1, choice_BT)
    return logits_BTN, probs_BTN, choice_BT, routing.chosen_prob(probs_BTN, choice_BT)

  def warming(self) -> Array:
    """Token choice: whether the balance warm-up is still on (counter < bal_warmup_steps)."""
    return self.counter[...] < self.cfg.token.bal_warmup_steps
