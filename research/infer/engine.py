"""A request-level inference engine: continuous (sequence-wise) batching of requests over a fixed
number of slots of one static-shape decode cache (docs/inference.md "Engine").

  engine = Engine(model, slots=8, max_len=256)  # temperature 0: greedy
  done = engine.serve([Request(prompt=[5, 9, 2], max_new_tokens=32, eos=0), ...])
  done[0].tokens, done[0].finish, done[0].mean_depth

Slot s is row s of one `Cache` [slots, max_len] (research/model/cache.py). Each engine step:

  1. admit: if slots are free and requests wait, one prefill call takes up to `prefill_batch` of
     them (first come, first served): their cache rows are gathered, emptied (`reset_slots`),
     run through the model on the prompts right-padded to one static bucket length (padding has
     segment 0: it writes no cache entry and does not advance the row), scattered back; the last
     prompt position's logits give each request's first token.
  2. decode: one forward over all slots, one token per row; the rows of free slots (and of
     requests that just finished) are padding (segment 0), so only the active rows advance.
  3. a request that picked its EOS token or used its budget is done: its slot is free for the
     next step's admission.

The compiled functions are fixed: one decode step, one prefill per bucket length (`buckets`;
default powers of two from 16 below max_len, then max_len), each traced once (`traces` counts
the traces). Sampling is `decode.pick` row by row with the request's key
`fold_in(key(seed), i)` for its i-th generated token, as `decode.generate` samples one request,
so the engine's output for a request equals `decode.generate` on that request alone with the
same max_len (tests/test_engine.py).
"""

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.infer import decode
from research.model import cache as cache_lib
from research.model import mor, recursion
from research.model.cache import Cache
from research.model.layers import KV, Carry, Site, SwiGLU, Tokens
from research.model.lm import LanguageModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
  """prompt: token ids (at least one); max_new_tokens: the generation budget (>= 1); eos: the
  token id that ends the request (None: only the budget); seed: its sampling key
  jax.random.key(seed) (unused when greedy)."""

  prompt: Sequence[int]
  max_new_tokens: int
  eos: int | None = None
  seed: int = 0


@dataclasses.dataclass
class Completion:
  """A served request: its generated tokens (ending with eos when finish is "eos", else
  max_new_tokens of them: finish "length"), the recursion steps summed over the tokens it ran
  through the model (the prompt and every generated token but the last; MoR only) and its
  admission and finish times in seconds after `serve` started."""

  request: int
  tokens: list[int]
  finish: str = ""
  depth_sum: int = 0
  depth_tokens: int = 0
  start_s: float = 0.0
  end_s: float = 0.0

  @property
  def mean_depth(self) -> float:
    """Mean recursion steps per token run (0.0 for a model without MoR routing)."""
    return self.depth_sum / max(self.depth_tokens, 1)


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Prefill lengths: smallest, 2 smallest, 4 smallest, ... below max_len, then max_len."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return (*out, max_len)


def reset_slots(cache: Cache, mask_B: Array) -> Cache:
  """The cache with the rows where mask_B is True emptied: length 0, depth 0, every site's entries
  marked empty (segment 0, position 0). Their keys and values stay: an empty entry is never
  read."""
  def where(empty, old):
    return jnp.where(mask_B.reshape((-1,) + (1,) * (old.ndim - 1)), empty, old)

  kv = {name: KV(site.k, site.v, site.tok._replace(
      positions=where(0, site.tok.positions), segments=where(0, site.tok.segments)))
        for name, site in cache.kv.items()}
  return Cache(kv, where(0, cache.depth), where(0, cache.length))


class Engine:
  """Serves requests through `slots` rows of a [slots, max_len] cache (module docstring)."""

  def __init__(self, model: LanguageModel, *, slots: int, max_len: int,
               buckets: Sequence[int] | None = None, prefill_batch: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0):
    if slots < 1:
      raise ValueError(f"Engine: slots={slots} must be >= 1")
    if max_len < 2:
      raise ValueError(f"Engine: max_len={max_len} must be >= 2")
    self.buckets = tuple(sorted(set(buckets or default_buckets(max_len))))
    if self.buckets[0] < 1 or self.buckets[-1] > max_len:
      raise ValueError(f"Engine: buckets={self.buckets} must lie in 1..max_len={max_len}")
    if temperature < 0:
      raise ValueError(f"Engine: temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
      raise ValueError(f"Engine: top_p={top_p} must be in (0, 1] (1: no nucleus cut)")
    self.slots, self.max_len = slots, max_len
    self.prefill_batch = min(slots, 4) if prefill_batch is None else prefill_batch
    if not 1 <= self.prefill_batch <= slots:
      raise ValueError(f"Engine: prefill_batch={prefill_batch} must be in 1..slots={slots}")
    self.temperature, self.top_p = float(temperature), float(top_p)
    self.routed = model.core.rule is not None  # MoR: tokens' depths are recorded
    self.graphdef, self.state = nnx.split(model)
    self.cache = model.init_cache(slots, max_len)  # donated to the compiled steps
    self.traces: collections.Counter[str] = collections.Counter()  # one per compilation
    self.stats: collections.Counter[str] = collections.Counter()
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=1)

  def bucket(self, n: int) -> int:
    """The prefill length of an n-token prompt: the smallest bucket that holds it."""
    return next(b for b in self.buckets if b >= n)

  def check(self, requests: Sequence[Request]) -> None:
    """Raises ValueError naming the first request that cannot be served."""
    for i, r in enumerate(requests):
      n = len(r.prompt)
      if n < 1 or r.max_new_tokens < 1:
        raise ValueError(f"request {i}: needs a prompt of >= 1 tokens (has {n}) and "
                         f"max_new_tokens >= 1 (has {r.max_new_tokens})")
      if n > self.buckets[-1] or n + r.max_new_tokens > self.max_len:
        raise ValueError(f"request {i}: its prompt ({n} tokens) plus max_new_tokens="
                         f"{r.max_new_tokens} exceed the cache (max_len={self.max_len}, largest "
                         f"prefill bucket {self.buckets[-1]})")

  def serve(self, requests: Sequence[Request],
            on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
    """Every request's completion, in request order; `on_finish` is called as each finishes."""
    self.check(requests)
    start = time.perf_counter()
    queue = collections.deque(range(len(requests)))
    done: dict[int, Completion] = {}
    owner: list[Completion | None] = [None] * self.slots  # the request each slot serves
    token_B = np.zeros((self.slots,), np.int32)
    index_B = np.zeros((self.slots,), np.int32)  # generated tokens so far: the key's fold-in
    key_B2 = np.zeros((self.slots, 2), np.uint32)

    def finish(c: Completion, token: int) -> bool:
      return _finish(requests[c.request], c, token, start, done, on_finish)

    while queue or any(c is not None for c in owner):
      for s, c, first in self._fill(requests, queue, owner, start, finish):
        token_B[s], index_B[s] = first, 1
        key_B2[s] = _key_data(requests[c.request].seed)
      active_B = np.asarray([c is not None for c in owner])
      if active_B.any():
        self.cache, next_B, depth_B = self._decode(self.state, self.cache, token_B, active_B,
                                                   key_B2, index_B)
        next_B, depth_B = np.asarray(next_B), np.asarray(depth_B)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += int(active_B.sum())
        for s in np.flatnonzero(active_B):
          c = owner[s]
          c.depth_sum += int(depth_B[s])
          c.depth_tokens += 1
          if finish(c, int(next_B[s])):
            owner[s] = None
          else:
            token_B[s], index_B[s] = next_B[s], index_B[s] + 1
    return [done[i] for i in range(len(requests))]

  def _fill(self, requests: Sequence[Request], queue: collections.deque,
            owner: list["Completion | None"], start: float, finish: Callable
            ) -> list[tuple[int, "Completion", int]]:
    """Admission: if slots are free and requests wait, one prefill call takes up to
    prefill_batch of them into the free slots (`owner` updated); (slot, completion, first token)
    of each that did not already finish at its first token."""
    free = [s for s in range(self.slots) if owner[s] is None]
    if not (queue and free):
      return []
    take = [queue.popleft() for _ in range(min(len(free), self.prefill_batch, len(queue)))]
    admitted = []
    for s, (c, first) in zip(free, self._admit(requests, take, free, start), strict=False):
      if not finish(c, first):
        owner[s] = c
        admitted.append((s, c, first))
    return admitted

  def _admit(self, requests: Sequence[Request], take: list[int], free: list[int],
             start: float) -> list[tuple[Completion, int]]:
    """One prefill call for the requests `take` into the first free slots: their completions
    (no tokens yet) and first tokens."""
    p, t = self.prefill_batch, self.bucket(max(len(requests[i].prompt) for i in take))
    tokens_PT = np.zeros((p, t), np.int32)
    lengths_P = np.zeros((p,), np.int32)
    slots_P = np.full((p,), self.slots, np.int32)  # out of range: an unused row, dropped
    key_P2 = np.zeros((p, 2), np.uint32)
    for j, i in enumerate(take):
      prompt = requests[i].prompt
      tokens_PT[j, :len(prompt)], lengths_P[j], slots_P[j] = prompt, len(prompt), free[j]
      key_P2[j] = _key_data(requests[i].seed)
    now = time.perf_counter() - start
    self.cache, first_P, depth_P = self._prefill(self.state, self.cache, slots_P, tokens_PT,
                                                 lengths_P, key_P2)
    first_P, depth_P = np.asarray(first_P), np.asarray(depth_P)
    self.stats["prefill_calls"] += 1
    self.stats["prefill_rows"] += len(take)
    return [(Completion(i, [], depth_sum=int(depth_P[j]), depth_tokens=int(lengths_P[j]),
                        start_s=now), int(first_P[j])) for j, i in enumerate(take)]

  def _pick(self, logits_BV: Array, key_B2: Array, index_B: Array) -> Array:
    """Each row's next token: decode.pick on that row alone with fold_in(its key, index)."""
    if self.temperature == 0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def one(logits_V, key_2, i):
      key = jax.random.fold_in(jax.random.wrap_key_data(key_2), i)
      return decode.pick(logits_V[None], self.temperature, key, self.top_p)[0]

    return jax.vmap(one)(logits_BV, key_B2, index_B)

  def _decode_fn(self, state, cache: Cache, token_B: Array, active_B: Array, key_B2: Array,
                 index_B: Array) -> tuple[Cache, Array, Array]:
    """One token per slot; inactive slots are padding. (cache, next tokens, their depths)."""
    self.traces["decode"] += 1
    model = nnx.merge(self.graphdef, state)
    logits_B1V, aux, cache = model(token_B[:, None], segments_BT=active_B[:, None].astype(
        jnp.int32), cache=cache)
    depth_B = aux["route/depth"][:, 0] if self.routed else jnp.zeros_like(token_B)
    return cache, self._pick(logits_B1V[:, 0], key_B2, index_B), depth_B

  def _prefill_fn(self, state, cache: Cache, slots_P: Array, tokens_PT: Array, lengths_P: Array,
                  key_P2: Array) -> tuple[Cache, Array, Array]:
    """Prompts (right-padded with segment 0) into emptied slots_P rows (out of range: unused):
    (cache, each request's first token, its prompt's depths summed)."""
    p, t = tokens_PT.shape
    self.traces[f"prefill/{t}"] += 1
    model = nnx.merge(self.graphdef, state)
    rows = jax.tree.map(lambda a: a.at[slots_P].get(mode="clip"), cache)
    rows = reset_slots(rows, jnp.ones((p,), bool))
    segments_PT = (jnp.arange(t)[None, :] < lengths_P[:, None]).astype(jnp.int32)
    logits_PTV, aux, rows = model(tokens_PT, segments_BT=segments_PT, cache=rows)
    last_PV = logits_PTV[jnp.arange(p), jnp.maximum(lengths_P - 1, 0)]
    first_P = self._pick(last_PV, key_P2, jnp.zeros((p,), jnp.int32))
    depth_P = (jnp.sum(aux["route/depth"] * segments_PT, axis=1) if self.routed
               else jnp.zeros((p,), jnp.int32))
    cache = jax.tree.map(lambda a, r: a.at[slots_P].set(r, mode="drop"), cache, rows)
    return cache, first_P, depth_P


def _finish(r: Request, c: Completion, token: int, start: float, done: dict[int, Completion],
            on_finish: Callable[[Completion], None] | None) -> bool:
  """Appends `token` to c; if it ends the request (its eos, or the budget), records c in `done`
  (and tells on_finish) and returns True."""
  c.tokens.append(token)
  if token != r.eos and len(c.tokens) < r.max_new_tokens:
    return False
  c.finish = "eos" if token == r.eos else "length"
  c.end_s = time.perf_counter() - start
  done[c.request] = c
  if on_finish is not None:
    on_finish(c)
  return True


def _key_data(seed: int) -> np.ndarray:
  """The raw uint32 data of jax.random.key(seed) (the engine passes keys as data)."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


EXITED = -2  # DepthwiseEngine: the slot's token left the core and waits for the coda
IDLE = -1  # no token in flight


class DepthwiseEngine(Engine):
  """Continuous depth-wise batching (MoR §3.3, App. E) for expert choice with recursion-wise
  caching: every slot holds at most one token in flight, each at its own recursion step, and
  one engine step is

    entry   the slots' new tokens: embedding, prelude (every slot, masked), the step-1 router;
    core    the shared block run ONCE on `block_rows` rows gathered from the slots whose token
            waits for a step (deepest first, then longest waiting), each row attending to its
            slot's cache site of its own depth ("core/<r B + j>": gathered per row, written
            back); the router of the next step decides who continues (the causal threshold
            rule, as in decoding);
    exit    the tokens that left the core (this step, or at entry): coda, final norm, head and
            the next token (every slot, masked), in one batch.

  Prefill is the sequence-wise one (Engine). A token of depth k spends k engine steps in the
  core (1 for depth 0); `stats["block_rows"]` counts the rows the shared block ran. Served:
  middle_cycle / cycle plans with shared norms, no LoRA, dense FFNs, model.mor.kv='cache'
  (ValueError naming the key otherwise)."""

  def __init__(self, model: LanguageModel, *, slots: int, max_len: int,
               block_rows: int | None = None, **kw):
    core = model.core
    plan, b = core.plan, core.plan.num_shared
    refuse = [
        (not isinstance(core.rule, mor.ExpertChoice), "model.mor.kind", "must be 'expert'"),
        (core.kv_mode != "cache", "model.mor.kv", "must be 'cache' (recursion-wise caching)"),
        (core.lora is not None, "model.recursion.lora_rank", "must be 0 (no per-depth LoRA)"),
        (core.attn_norms is not None, "model.recursion.share_norms", "must be True"),
        (any(plan.order[d] != plan.order[d % b] for d in range(len(plan.order))),
         "model.recursion.strategy", "must be cycle or middle_cycle (one block per step slot)"),
        (any(not isinstance(blk.ffn, SwiGLU) for blk in (*model.prelude.blocks, *core.blocks,
                                                         *model.coda.blocks)),
         "model.moe.num_experts", "must be 0 (dense FFNs)"),
    ]
    for bad, key, why in refuse:
      if bad:
        raise ValueError(f"DepthwiseEngine: config.{key}: {why} for depth-wise batching")
    super().__init__(model, slots=slots, max_len=max_len, **kw)
    self.block_rows = slots if block_rows is None else block_rows
    if not 1 <= self.block_rows <= slots:
      raise ValueError(f"DepthwiseEngine: block_rows={block_rows} must be in 1..slots={slots}")
    self.width, self.dtype = model.embed.embedding.shape[1], model.embed.dtype
    self._step = jax.jit(self._step_fn, donate_argnums=(1, 2))

  def serve(self, requests: Sequence[Request],
            on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
    """Every request's completion, in request order (Engine.serve, depth-wise decoding)."""
    self.check(requests)
    start = time.perf_counter()
    queue = collections.deque(range(len(requests)))
    done: dict[int, Completion] = {}
    owner: list[Completion | None] = [None] * self.slots
    token_S = np.zeros((self.slots,), np.int32)
    enter_S = np.zeros((self.slots,), bool)  # a new token enters the model this step
    index_S = np.zeros((self.slots,), np.int32)
    key_S2 = np.zeros((self.slots, 2), np.uint32)
    flight = (jnp.zeros((self.slots, self.width), self.dtype),
              jnp.full((self.slots,), IDLE, jnp.int32),
              jnp.zeros((self.slots,), jnp.float32), jnp.zeros((self.slots,), jnp.int32),
              jnp.zeros((self.slots,), jnp.int32))

    def finish(c: Completion, token: int) -> bool:
      return _finish(requests[c.request], c, token, start, done, on_finish)

    while queue or any(c is not None for c in owner):
      for s, c, first in self._fill(requests, queue, owner, start, finish):
        token_S[s], enter_S[s], index_S[s] = first, True, 1
        key_S2[s] = _key_data(requests[c.request].seed)
      if not any(c is not None for c in owner):
        continue
      self.cache, flight, next_S, exited_S, depth_S, rows = self._step(
          self.state, self.cache, flight, token_S, enter_S, key_S2, index_S)
      next_S, exited_S, depth_S = np.asarray(next_S), np.asarray(exited_S), np.asarray(depth_S)
      self.stats["engine_steps"] += 1
      self.stats["block_rows"] += int(rows)
      enter_S[:] = False
      for s in np.flatnonzero(exited_S):
        c = owner[s]
        c.depth_sum += int(depth_S[s])
        c.depth_tokens += 1
        if finish(c, int(next_S[s])):
          owner[s] = None
        else:
          token_S[s], enter_S[s], index_S[s] = next_S[s], True, index_S[s] + 1
    return [done[i] for i in range(len(requests))]

  def _step_fn(self, state, cache: Cache, flight, token_S: Array, enter_S: Array,
               key_S2: Array, index_S: Array):
    """One engine step (class docstring): (cache, flight, next token per slot, which slots'
    token left the model, its depth, rows the shared block ran). flight = (hidden [S, D], the
    step each slot's token waits for (IDLE, EXITED), its gate, steps run, engine steps it has
    waited unserved)."""
    self.traces["step"] += 1
    model = nnx.merge(self.graphdef, state)
    core, rule = model.core, model.core.rule
    nr, b, s = core.plan.num_recursions, core.plan.num_shared, self.slots
    x_SD, r_S, w_S, steps_S, wait_S = flight

    def decide(x_BD: Array, r: int) -> tuple[Array, Array]:
      """Whether a token with state x runs step r (threshold rule), and its gate."""
      _, _, logit_B1, w_B1 = rule.scores(core, x_BD[:, None], r)
      run_B = mor.threshold_route(jnp.ones_like(logit_B1, bool), logit_B1, rule.capacity[r])
      return run_B[:, 0], w_B1[:, 0].astype(jnp.float32)

    # entry: embedding and prelude of the new tokens, then the step-1 decision
    x_S1D, _, _, carry = model.inputs(token_S[:, None], None, enter_S[:, None].astype(jnp.int32),
                                      cache)
    kv = dict(carry.kv)
    run_S, w0_S = decide(x_S1D[:, 0], 0)
    x_SD = jnp.where(enter_S[:, None], x_S1D[:, 0], x_SD)
    r_S = jnp.where(enter_S, jnp.where(run_S, 0, EXITED), r_S)
    w_S = jnp.where(enter_S, w0_S, w_S)
    steps_S = jnp.where(enter_S, 0, steps_S)
    wait_S = jnp.where(enter_S, 0, wait_S)

    # core: block_rows rows at their own steps through the shared block, once
    waiting_S = r_S >= 0
    # deepest step first, then the longest unserved (no row waits forever), idle slots last
    order = jnp.lexsort((-wait_S, jnp.where(waiting_S, -r_S, nr)))
    idx_R = order[:self.block_rows]
    valid_R, r_R = waiting_S[idx_R], jnp.maximum(r_S[idx_R], 0)
    pos_R = cache.length[idx_R]
    tok_R = Tokens(pos_R[:, None], valid_R[:, None].astype(jnp.int32), pos_R[:, None])
    x_R1D = x_SD[idx_R][:, None]
    y_R1D = x_R1D
    for j in range(b):
      names = [f"{recursion.SITE}/{r * b + j}" for r in range(nr)]
      rows_kv = _select(r_R, [jax.tree.map(lambda a: a[idx_R], kv[n]) for n in names])
      block = core.blocks[core.plan.order[j]]
      y_R1D, _, out = block.forward(y_R1D, tok_R, site=Site("row"),
                                    carry=Carry(kv={"row": rows_kv}))
      for r, n in enumerate(names):
        to_R = jnp.where(valid_R & (r_R == r), idx_R, s)  # out of range: not this site's row
        kv[n] = jax.tree.map(lambda a, new, to_R=to_R: a.at[to_R].set(new, mode="drop"), kv[n],
                             out.kv["row"])
    w_R = w_S[idx_R]
    x_new_RD = (x_R1D + (w_R[:, None, None].astype(y_R1D.dtype) * y_R1D).astype(x_R1D.dtype))[:, 0]
    next_R = r_R + 1
    cont_R, w_next_R = jnp.zeros_like(valid_R), jnp.zeros_like(w_R)
    for r in range(1, nr):
      run_R, w_r_R = decide(x_new_RD, r)
      cont_R = jnp.where(next_R == r, run_R, cont_R)
      w_next_R = jnp.where(next_R == r, w_r_R, w_next_R)
    to_R = jnp.where(valid_R, idx_R, s)
    x_SD = x_SD.at[to_R].set(x_new_RD, mode="drop")
    r_S = r_S.at[to_R].set(jnp.where(cont_R, next_R, EXITED), mode="drop")
    w_S = w_S.at[to_R].set(w_next_R, mode="drop")
    steps_S = steps_S.at[to_R].set(steps_S[idx_R] + 1, mode="drop")
    wait_S = jnp.where(waiting_S, wait_S + 1, 0).at[to_R].set(0, mode="drop")

    # exit: coda, norm, head and the next token of the tokens that left the core
    exited_S = r_S == EXITED
    tok_S = cache_lib.new_tokens(cache, None, exited_S[:, None].astype(jnp.int32))
    h_S1D, _, carry = model.coda.forward(x_SD[:, None], tok_S, Carry(kv=kv))
    next_S = self._pick(model.logits(h_S1D)[:, 0], key_S2, index_S)
    rows = jnp.arange(s)
    depth = cache.depth.at[rows, cache.length].set(
        jnp.where(exited_S, steps_S, cache.depth[rows, cache.length]), mode="drop")
    cache = Cache({n: carry.kv[n] for n in cache.kv}, depth,
                  cache.length + exited_S.astype(jnp.int32))
    r_S = jnp.where(exited_S, IDLE, r_S)
    return (cache, (x_SD, r_S, w_S, steps_S, wait_S), next_S, exited_S, steps_S,
            jnp.sum(valid_R, dtype=jnp.int32))


def _select(r_R: Array, trees: list) -> object:
  """Row i of trees[r_R[i]] (trees of equal structure, leaves [R, ...])."""
  def pick(*leaves):
    out = leaves[0]
    for r, leaf in enumerate(leaves[1:], start=1):
      out = jnp.where((r_R == r).reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, out)
    return out

  return jax.tree.map(pick, *trees)
