"""Mixture-of-Recursions routers (Bae et al. 2025, arXiv 2507.10524; docs/methods/mor.md §2-3).

A MoR model is the tied recursion core of recursion.py with one of these rules plugged in
(`Recursion.rule`); the rule only decides which tokens run each recursion step r (the B shared
layers of the step, with that depth's LoRA and norms) and with what weight, and the core runs the
step through the one routed path (routed.py): select -> gather -> compute -> scatter with gate.

  expert choice (§2.2)  step r: router r scores the tokens that ran step r-1 (S_{r-1}); the top
      k_r = max(1, floor(c_r T)) of each row, sorted, form S_r; the step runs on H[S_r] at their
      original positions; H[S_r] += g * f(H[S_r]), f = the step's layers with their residual
      (Eq. 2.1), g = alpha * sigmoid(s). Aux BCE pulls sigma(s) toward the top-k decision.
  token choice (§2.4)   one router on the core input x1 picks depth d_t in 1..Nr (top-1);
      step r runs the tokens with d_t >= r; out_t = x1_t + g_t f^{d_t}(x1_t) (gate at exit, as in
      the code; "every" gates every step as Eq. 2.2 writes it).

`impl` "gather" runs the step on the selected tokens only (FLOPs saved); "masked" is the
full-length reference with the mask M_r[i, j] = [i, j in S_r and j <= i] (§3.1); both give the
same selected rows and leave the others bit-identical (tests/test_mor.py).

Decoding (a cache in the carry, `Carry.depth` set) routes causally (§2.5): expert choice by the
threshold rule sigma(s_r) > 0.5 whatever the run trained with, token choice by its top-1 depth
(capacity buffers counted over the cached row, `routing.capped_depths`), both in place.

The KV modes (§3) are sites (layers.Site, `Recursion.site`): cache - step r attends among its own
tokens (recursion-wise caching); share - steps r >= 2 read the K/V every token produced at
recursion 1 in the same layer and skip their K/V projections; share_update - share, with the
step's tokens' fresh K/V laid over their own entries (Table 15's hybrid; expert choice only).

Non-trainable state (loss-free bias, warm-up counter) leaves the forward as aux["update/<path>"]
values; research/train/step.py writes them back after the optimizer step. The decisions leave as
aux["route/..."] entries (`routes`), which the train step drops from its metrics.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research import routing
from research.model import aux as aux_lib
from research.model import routed, routers
from research.model.layers import Carry, Tokens

Array = jax.Array
PATH = "core"  # the LanguageModel attribute holding the core (prefix of its update/ keys)
BINS = 10  # router-score histogram bins over [0, 1]


class Routes(NamedTuple):
  """Routing decisions of one forward, for tests and analysis (rebuilt from aux by `routes`).

  selected[r]: [B, T] bool, token ran step r. indices[r] / valid[r]: [B, K_r] the sorted row
  positions of step r's slots and whether a slot holds a selected token (expert choice's top-k
  steps, token choice's gathered buffers; empty for threshold routing, whose count is dynamic).
  depth: [B, T] steps run by each token.
  """

  selected: tuple[Array, ...]
  indices: tuple[Array, ...]
  valid: tuple[Array, ...]
  depth: Array


def routes(aux: dict) -> Routes:
  """The Routes a MoR core left in its aux dict."""
  nr = aux["route/selected"].shape[0]
  steps = [r for r in range(nr) if f"route/indices/{r}" in aux]
  return Routes(tuple(aux["route/selected"]), tuple(aux[f"route/indices/{r}"] for r in steps),
                tuple(aux[f"route/valid/{r}"] for r in steps), aux["route/depth"])


def route_aux(selected: list[Array], slots: list[tuple[Array, Array] | None]) -> dict:
  """aux["route/..."] of the steps' decisions: row-order masks, and the (sorted positions,
  valid) slots of each step that chose a fixed number of tokens (None for the others)."""
  aux = {"route/selected": jnp.stack(selected),
         "route/depth": jnp.sum(jnp.stack(selected), axis=0, dtype=jnp.int32)}
  for r, s in enumerate(slots):
    if s is not None:
      aux[f"route/indices/{r}"], aux[f"route/valid/{r}"] = s
  return aux


def capacities(m: mlc.ConfigDict) -> tuple[float, ...]:
  """model.mor.capacity, or the paper's default (Nr - r + 1) / Nr."""
  return tuple(m.mor.capacity) or routing.default_capacities(m.recursion.num_recursions)


def threshold_route(valid_BC: Array, rule_BC: Array, capacity: float) -> Array:
  """The causal inference rule (§2.5): a candidate runs the step iff sigma(rule) > 0.5, except
  that a step of capacity 1 passes every candidate."""
  return valid_BC & (rule_BC > 0) if capacity < 1 else valid_BC


def token_update(gate: str, r: int, x_BKD: Array, x1_BKD: Array, y_BKD: Array, w_BK: Array,
                 d_BK: Array) -> Array:
  """Token-choice state after step r (§2.4 step 4): exiting tokens (depth r + 1) get x1 + w f,
  continuing ones f (gate 'every': w f)."""
  w_BK1 = w_BK[..., None]
  inner = w_BK1 * y_BKD if gate == "every" else y_BKD
  return jnp.where(d_BK[..., None] == r + 1, x1_BKD + w_BK1 * y_BKD, inner).astype(x_BKD.dtype)


def row_mask(slots: routed.Slots, t: int) -> Array:
  """[B, T] True at the row positions the slots' valid entries hold."""
  if slots.idx is None:
    return slots.valid
  b = slots.valid.shape[0]
  return jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], slots.idx].set(slots.valid)


def build_router(m: mlc.ConfigDict, *, param_dtype, rngs: nnx.Rngs) -> dict:
  """The networks and variables of model.mor.kind, as the core's attributes (None when absent):
  router (one per step for expert choice, one for token choice), aux_router (expert choice,
  sampling='aux_router'), bias (token choice, loss-free balancing), counter (a warm-up)."""
  c, nr = m.mor, m.recursion.num_recursions
  if c.kind == "none":
    return dict(router=None, aux_router=None, bias=None, counter=None)
  expert = c.kind == "expert"

  def router(num, out, **kw):
    return routers.Router(num, m.d_model, out, c.router, std=m.init_std,
                          param_dtype=param_dtype, rngs=rngs, **kw)

  warmup = c.expert.cap_warmup_steps if expert else c.token.bal_warmup_steps
  return dict(
      router=router(nr, 1) if expert else router(1, nr),
      aux_router=(router(nr, 1, lr_mult=c.expert.aux_router_lr_mult)
                  if expert and c.expert.sampling == "aux_router" else None),
      bias=(routers.RouterBias(jnp.zeros((nr,), jnp.float32))
            if not expert and c.token.balancing == "loss_free" else None),
      counter=routers.Counter(jnp.zeros((), jnp.int32)) if warmup > 0 else None)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What both rules share: the model.mor section and the number of steps (static)."""

  cfg: mlc.FrozenConfigDict
  num_recursions: int
  capacity: tuple[float, ...]

  def finish(self, core, aux: dict, selected: list[Array],
             slots: list[tuple[Array, Array] | None], tok: Tokens) -> dict:
    """The aux entries every rule adds: counter update, z-loss, depth fractions, routes."""
    if core.counter is not None:
      aux[f"update/{PATH}/counter"] = core.counter[...] + 1
    if self.cfg.z_coeff > 0:
      aux["loss/mor_z"] = self.cfg.z_coeff * jnp.sum(aux["mor/z"])
    aux.update(route_aux(selected, slots))
    aux["mor/depth_frac"] = routing.load(aux["route/depth"], tok.segments != 0,
                                         self.num_recursions + 1)
    return aux


class ExpertChoice(Rule):
  """§2.2: nested top-k over each row's tokens, one router per step (`mode` "add": a step adds
  its gated output, H += g f(H))."""

  mode = "add"

  def __call__(self, core, x_BTD: Array, tok: Tokens, carry: Carry, head=None
               ) -> tuple[Array, dict, Carry]:
    """(state, aux, carry); `head` unused (the routers decide)."""
    c, e = self.cfg, self.cfg.expert
    t = x_BTD.shape[1]
    nr = self.num_recursions
    threshold = e.route == "threshold" or carry.depth is not None  # decoding routes causally
    gather = c.impl == "gather" and not threshold
    ks = routing.tokens_per_step(self.capacity, t)
    live = [None] * nr
    if e.cap_warmup_steps > 0:  # capacities start at 1: no compaction while training
      live = [routing.live_tokens(routing.warmup_capacity(cap, core.counter[...],
                                                          e.cap_warmup_steps), t)
              for cap in self.capacity]
      ks = (t,) * nr
    idx_BC, valid_BC = None, tok.segments != 0  # candidates S_0: every real token, in place
    stats, selected, all_slots, auxes = [], [], [], []
    for r in range(nr):
      x_BCD = x_BTD if idx_BC is None else routing.gather_rows(x_BTD, idx_BC)
      s_BC, g_BC, rule_BC, w_BC = self.scores(core, x_BCD, r)
      if threshold:
        target_BC = threshold_route(valid_BC, rule_BC, self.capacity[r])
        slots, w_BK, chosen = routed.in_place(target_BC), w_BC, None
      else:
        loc_BK, sel_BK, target_BC = routing.select_topk(g_BC, valid_BC, ks[r], live[r])
        idx_BK = loc_BK if idx_BC is None else routing.gather_rows(idx_BC, loc_BK)
        chosen = (idx_BK, sel_BK)
        if gather and ks[r] < t:
          slots, w_BK = routed.Slots(idx_BK, sel_BK), routing.gather_rows(w_BC, loc_BK)
        else:  # the whole row in place (masked reference, or a step that keeps every token)
          slots, w_BK = routed.in_place(target_BC), w_BC
      x_BTD, (aux, carry) = core.run_step(r, x_BTD, tok, slots, carry, w_BK, mode="add")
      auxes.append(aux)
      stats.append(self.stats(s_BC, rule_BC, target_BC, valid_BC))
      selected.append(row_mask(slots, t))
      all_slots.append(chosen)
      idx_BC, valid_BC = slots.idx, slots.valid  # in place: None and the row-order mask
    aux = {k: jnp.stack([st[k] for st in stats]) for k in stats[0]}
    if core.aux_router is None:
      aux["loss/mor_bce"] = e.aux_coeff * jnp.sum(aux["mor/bce"])
    else:
      aux["loss/mor_aux_router"] = jnp.sum(aux["mor/bce"])
    aux = aux_lib.add_aux([aux, *auxes])
    return x_BTD, self.finish(core, aux, selected, all_slots, tok), carry

  def scores(self, core, x_BCD: Array, r: int) -> tuple[Array, Array, Array, Array]:
    """§2.2 step 2 for step r's candidates: router logits s, gate g = alpha func(s), the logits
    of the causal rule sigma > 0.5 (the aux router's when there is one) and the combine weight
    (g, or 1 for additive gating)."""
    c, e = self.cfg, self.cfg.expert
    s_BC = core.router(x_BCD / c.temp, r)[..., 0]
    g_BC = routing.expert_gate(s_BC, e.func, e.alpha)
    rule_BC = (s_BC if core.aux_router is None
               else core.aux_router(jax.lax.stop_gradient(x_BCD) / c.temp, r)[..., 0])
    w_BC = g_BC if e.gating == "weighted" else jnp.ones_like(g_BC)
    return s_BC, g_BC, rule_BC, w_BC

  def decide_rows(self, core, x_RD: Array, next_R: Array, head=None) -> tuple[Array, Array]:
    """For tokens at different steps (the depth-wise engine): whether each runs step next_R
    (0-based; none at next_R = Nr) by the causal threshold rule (§2.5), and its gate."""
    go_R, w_R = jnp.zeros(next_R.shape, bool), jnp.zeros(next_R.shape, jnp.float32)
    for r in range(self.num_recursions):
      _, _, rule_R1, w_R1 = self.scores(core, x_RD[:, None], r)
      run_R = threshold_route(jnp.ones_like(rule_R1, bool), rule_R1, self.capacity[r])[:, 0]
      go_R = jnp.where(next_R == r, run_R, go_R)
      w_R = jnp.where(next_R == r, w_R1[:, 0].astype(jnp.float32), w_R)
    return go_R, w_R

  def stats(self, s_BC, rule_BC, target_BC, valid_BC) -> dict[str, Array]:
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


class TokenChoice(Rule):
  """§2.4: one router picks each token's depth; step r runs the tokens with depth >= r."""

  mode = "set"

  def __call__(self, core, x_BTD: Array, tok: Tokens, carry: Carry, head=None
               ) -> tuple[Array, dict, Carry]:
    """(state, aux, carry); `head` unused (the router decides)."""
    c, tc = self.cfg, self.cfg.token
    t = x_BTD.shape[1]
    nr = self.num_recursions
    decoding = carry.depth is not None
    valid_BT = tok.segments != 0
    logits_BTN, probs_BTN, choice_BT, gate_BT = self.route(core, x_BTD)
    row = carry.depth.shape[1] if decoding else t  # buffers are shares of the row length
    buffers = routing.token_buffers(nr, row, tc.capacity_factor)
    depth_BT = jnp.where(valid_BT, choice_BT + 1, 0)
    if min(buffers) < row:
      before_BN = None
      if decoding:  # tokens already in the cache took their slots first
        before_BN = jnp.stack([jnp.sum(carry.depth >= r + 1, axis=1) for r in range(nr)], 1)
      depth_BT = routing.capped_depths(depth_BT, buffers, before_BN)
    x1_BTD, state_BTD = x_BTD, x_BTD
    selected, all_slots, auxes, computed = [], [], [], []
    for r in range(nr):
      active_BT = depth_BT >= r + 1

      def run(slots, state_BTD, carry, r=r):
        """Step r on `slots`: the new state and (aux, carry)."""
        x1_BKD, w_BK, d_BK = (routed.gather(a, slots) for a in (x1_BTD, gate_BT, depth_BT))

        def update(x_BKD, y_BKD):
          return token_update(tc.gate, r, x_BKD, x1_BKD, y_BKD, w_BK, d_BK)

        return core.run_step(r, state_BTD, tok, slots, carry, mode="set", then=update)

      gathered = c.impl == "gather" and not decoding
      chosen, slots_r = None, jnp.asarray(t, jnp.int32)
      if gathered and buffers[r] < t:
        slots = routed.Slots(*routing.first_come(active_BT, buffers[r]))
        chosen, slots_r = (slots.idx, slots.valid), jnp.asarray(buffers[r], jnp.int32)
        state_BTD, (aux, carry) = run(slots, state_BTD, carry)
      elif gathered and r > 0 and tc.exact_buckets > 1:  # exact: the smallest bucket that fits
        state_BTD, (aux, carry), slots_r = exact_step(run, active_BT, state_BTD, carry,
                                                      tc.exact_buckets, checkpoint=not core.remat)
      else:  # the whole row in place: masked reference, decoding, step 1 of exact mode
        state_BTD, (aux, carry) = run(routed.in_place(active_BT), state_BTD, carry)
      auxes.append(aux)
      computed.append(slots_r.astype(jnp.float32) / t)
      selected.append(active_BT)
      all_slots.append(chosen)
    load_N = routing.load(choice_BT, valid_BT, nr)
    aux = {
        "mor/z": routing.z_loss(logits_BTN, valid_BT),
        "mor/balance": routing.balancing_loss(probs_BTN, choice_BT, valid_BT),
        "mor/load": load_N,
        "mor/maxvio": routing.max_violation(load_N),
        "mor/entropy": routing.mean_prob_entropy(probs_BTN, valid_BT),
        "mor/hist_gate": routing.histogram(gate_BT / tc.alpha, valid_BT, BINS),
        "mor/computed_frac": jnp.stack(computed),  # [Nr] slots each step ran on, over T
    }
    if tc.balancing == "loss":
      aux["loss/mor_balance"] = tc.bal_coeff * aux["mor/balance"]
    if core.bias is not None:
      new_bias = routing.loss_free_bias(core.bias[...], load_N, tc.bias_rate)
      if core.counter is not None:
        new_bias = jnp.where(self.warming(core), 0.0, new_bias)
      aux[f"update/{PATH}/bias"] = new_bias
    aux = aux_lib.add_aux([aux, *auxes])
    return state_BTD, self.finish(core, aux, selected, all_slots, tok), carry

  def route(self, core, x1_BTD: Array) -> tuple[Array, Array, Array, Array]:
    """§2.4 steps 1-2 on the core input x1: router logits, p, the top-1 depth index (argmax of
    p + bias; Nr - 1 for every token during the balance warm-up) and its gate p[choice]."""
    tc, nr = self.cfg.token, self.num_recursions
    logits_BTN = core.router(x1_BTD / self.cfg.temp, 0)
    probs_BTN = routing.token_probs(logits_BTN, tc.func, tc.alpha)
    bias_N = jnp.zeros((nr,), jnp.float32) if core.bias is None else core.bias[...]
    choice_BT = routing.top1_depth(probs_BTN, bias_N)
    if core.counter is not None:  # balance warm-up: everyone runs every step
      choice_BT = jnp.where(self.warming(core), nr - 1, choice_BT)
    return logits_BTN, probs_BTN, choice_BT, routing.chosen_prob(probs_BTN, choice_BT)

  def warming(self, core) -> Array:
    """Whether the balance warm-up is still on (counter < bal_warmup_steps)."""
    return core.counter[...] < self.cfg.token.bal_warmup_steps


def exact_sizes(seq_len: int, buckets: int) -> tuple[int, ...]:
  """Static slot counts of exact token choice: ceil(i T / n) for i = 1..n (n = buckets)."""
  return tuple(sorted({-(-i * seq_len // buckets) for i in range(1, buckets + 1)}))


def exact_step(run, active_BT: Array, state_BTD: Array, carry: Carry, buckets: int, *,
               checkpoint: bool):
  """Exact token choice, step r on its tokens only: K = the smallest of `exact_sizes` that holds
  every row's active tokens (first come, so nothing is dropped), chosen at run time by
  lax.switch over one compiled step per size. Equal to the step over the whole row in place.
  Returns run's (state, (aux, carry)) and K.

  `checkpoint` rematerialises each branch in the backward pass. Under grad a switch must return
  the residuals of every branch (zeros for those not taken); with the blocks not already
  rematerialised these are the branches' activations, and writing them cost more than the
  compaction saved (bench/mor_train_throughput.py, docs/benchmarks.md), while recomputing the
  taken branch's forward costs less."""
  t = active_BT.shape[1]
  sizes = jnp.asarray(exact_sizes(t, buckets), jnp.int32)
  count = jnp.max(jnp.sum(active_BT, axis=1, dtype=jnp.int32))
  branch = jnp.searchsorted(sizes, count)

  def at(k):
    slots = (routed.in_place(active_BT) if k == t
             else routed.Slots(*routing.first_come(active_BT, k)))
    fn = lambda state_BTD, carry: run(slots, state_BTD, carry)
    return jax.checkpoint(fn) if checkpoint else fn

  branches = [at(k) for k in exact_sizes(t, buckets)]
  return (*jax.lax.switch(branch, branches, state_BTD, carry), sizes[branch])


def make_rule(m: mlc.ConfigDict) -> Rule | None:
  """The routing rule of model.mor.kind (None: every token runs every step)."""
  if m.mor.kind == "none":
    return None
  kind = ExpertChoice if m.mor.kind == "expert" else TokenChoice
  return kind(mlc.FrozenConfigDict(m.mor), m.recursion.num_recursions, capacities(m))
