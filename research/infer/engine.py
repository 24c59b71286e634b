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
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.infer import decode
from research.model import cache as cache_lib
from research.model import early_exit, mor, recursion, routed
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


def default_edge_sizes(slots: int) -> tuple[int, ...]:
  """The depth-wise engine's compiled edge sizes: a quarter, half and all of the slots."""
  return tuple(sorted({max(1, math.ceil(slots / 4)), max(1, math.ceil(slots / 2)), slots}))


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
               temperature: float = 0.0, top_p: float = 1.0, profile: bool = False):
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
    self.profile = profile  # time each compiled call to its results: stats["time/<call>"]
    self.routed = model.core.rule is not None  # MoR: tokens' depths are recorded
    self.graphdef, self.state = nnx.split(model)
    self.cache = self.init_cache(model)  # donated to the compiled steps
    self.traces: collections.Counter[str] = collections.Counter()  # one per compilation
    self.stats: collections.Counter[str] = collections.Counter()
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=1)

  def init_cache(self, model: LanguageModel):
    """The engine's empty cache: the model's decode cache of slots rows of max_len."""
    return model.init_cache(self.slots, self.max_len)

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
        t0 = time.perf_counter()
        self.cache, next_B, depth_B = self._decode(self.state, self.cache, token_B, active_B,
                                                   key_B2, index_B)
        next_B, depth_B = np.asarray(next_B), np.asarray(depth_B)
        if self.profile:
          self.stats["time/decode"] += time.perf_counter() - t0
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
    t0 = time.perf_counter()
    now = t0 - start
    self.cache, first_P, depth_P, counted = self._prefill(self.state, self.cache, slots_P,
                                                          tokens_PT, lengths_P, key_P2)
    first_P, depth_P = np.asarray(first_P), np.asarray(depth_P)
    if self.profile:
      self.stats["time/prefill"] += time.perf_counter() - t0
    for name, value in counted.items():
      self.stats[name] += int(value)
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
                  key_P2: Array) -> tuple[Cache, Array, Array, dict]:
    """Prompts (right-padded with segment 0) into emptied slots_P rows (out of range: unused):
    (cache, each request's first token, its prompt's depths summed, counters for stats)."""
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
    return cache, first_P, depth_P, {}


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
ENTER = -3  # DepthwiseEngine: an admitted slot's first token waits for the entry


class Pools(NamedTuple):
  """The depth-wise engine's cache: `outer` holds the prelude and coda sites (a `Cache` of
  [slots, max_len] rows, with the rows' lengths); `pools[j]` the core sites of shared layer j for
  every recursion step, one flat KV of sum_r slots x site_len[r] entries (row (r, s): entries
  offset[r] + s site_len[r] + i, i = 0.. in the order the row's tokens ran step r, `tok.indices`
  = i); `counts[r, s]` the entries row (r, s) holds."""

  outer: Cache
  pools: dict[int, KV]
  counts: Array


def site_lengths(model: LanguageModel, max_len: int, compact: bool) -> tuple[int, ...]:
  """Entries per slot of each recursion step's core sites: max_len, or with `compact` the step's
  capacity share ceil(c_r max_len) (recursion-wise caching's memory, MoR §3.1)."""
  nr = model.core.plan.num_recursions
  if not compact:
    return (max_len,) * nr
  return tuple(min(max_len, max(1, math.ceil(c * max_len))) for c in model.core.rule.capacity)


def depthwise_cache(model: LanguageModel, slots: int, max_len: int,
                    lengths: Sequence[int]) -> Pools:
  """An empty depth-wise cache (Pools) with `lengths[r]` entries per slot at step r."""
  outer = [n for n in model.sites() if not n.startswith(f"{recursion.SITE}/")]
  attn = model.core.blocks[0].attn
  heads, dh, dtype = attn.num_kv_heads, attn.head_dim, model.embed.dtype
  cache = cache_lib.empty(outer, slots, max_len, heads, dh, dtype)
  n = slots * sum(lengths)

  def pool() -> KV:
    zeros = jnp.zeros((n,), jnp.int32)
    return KV(jnp.zeros((n, heads, dh), dtype), jnp.zeros((n, heads, dh), dtype),
              Tokens(zeros, jnp.zeros_like(zeros), jnp.zeros_like(zeros)))

  return Pools(cache, {j: pool() for j in range(model.core.plan.num_shared)},
               jnp.zeros((len(lengths), slots), jnp.int32))


def cache_bytes(tree) -> int:
  """Bytes of every buffer of a cache pytree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


class DepthwiseEngine(Engine):
  """Continuous depth-wise batching (MoR §3.3, App. E) for expert choice with recursion-wise
  caching: every slot holds at most one token in flight, each at its own recursion step, and
  one engine step is

    edge    the slots whose token left the core in the last step or was just admitted, up to
            the edge size (longest waiting first): exit = coda, final norm, head and the next
            token, which ends the request (its EOS or budget, the host's rule) or enters at
            once; entry = embedding, prelude and the step-1 decision of the next token (an
            admitted slot's: prefill's);
    core    the shared block run ONCE on `block_rows` rows gathered from the slots whose token
            waits for a step (deepest first, then longest waiting), each row attending to its
            slot's entries of its own step (one gather per shared layer from the step pools,
            `Pools`), its new entry written back; the core's rule decides who continues (MoR's
            causal threshold rule, or the confidence exit, as in decoding).

  The edge size is chosen per step from `edge_sizes` (default a quarter, half and all of the
  slots; one compiled step each, at its first use or all ahead with `compile_steps`): the
  smallest that holds the slots waiting for it, which the previous step reports, so the edge
  never limits how many tokens a step makes.

  Prefill is the sequence-wise one (Engine) into a fresh [prefill_batch, max_len] cache, whose core
  sites are then compacted into the pools. With `compact`, a slot holds ceil(c_r max_len) entries of
  step r (`site_lengths`; `site_len` gives them explicitly): a token that would overflow its row's
  step-r entries exits before that step (counted in stats["capped"]; prompt entries past it are
  dropped, stats["dropped"]); without overflow the outputs are the model's. A token of depth k
  spends k engine steps in the core (1 for depth 0); `stats["block_rows"]` counts the rows the
  shared block ran. With `profile`, entry, core and exit run as three compiled calls, each timed to
  its results (stats["time/entry"], "time/core", "time/exit", and "time/prefill"); the rest of a
  serve is host scheduling.
  The shared block runs through the core's own `Recursion.loop_step` (each row with its step's
  LoRAs, merged as RRT App. K does, and norms), and who continues is the core's rule
  (`decide_rows`): MoR expert choice's causal threshold rule, or a recursive model's confidence
  exit (early_exit.py; the exit head then runs in the core on every row that ran a loop, and
  again at the edge on the exited ones).
  Served: middle_cycle / cycle plans, dense FFNs, MoR expert choice with model.mor.kv='cache'
  or recursive models with model.recursion.exit_threshold > 0 (cycle) (ValueError naming the
  key otherwise)."""

  def __init__(self, model: LanguageModel, *, slots: int, max_len: int,
               block_rows: int | None = None, edge_sizes: Sequence[int] | None = None,
               compact: bool = False, site_len: Sequence[int] | None = None, **kw):
    core = model.core
    plan, b = core.plan, core.plan.num_shared
    refuse = [
        (not isinstance(core.rule, (mor.ExpertChoice, early_exit.ConfidenceExit)),
         "model.mor.kind", "must be 'expert' (or a recursive model with "
         "model.recursion.exit_threshold > 0)"),
        (core.kv_mode != "cache", "model.mor.kv", "must be 'cache' (recursion-wise caching)"),
        (any(plan.order[d] != plan.order[d % b] for d in range(len(plan.order))),
         "model.recursion.strategy", "must be cycle or middle_cycle (one block per step slot)"),
        (any(not isinstance(blk.ffn, SwiGLU) for blk in (*model.prelude.blocks, *core.blocks,
                                                         *model.coda.blocks)),
         "model.moe.num_experts", "must be 0 (dense FFNs)"),
    ]
    for bad, key, why in refuse:
      if bad:
        raise ValueError(f"DepthwiseEngine: config.{key}: {why} for depth-wise batching")
    self.site_len = (site_lengths(model, max_len, compact) if site_len is None
                     else tuple(site_len))
    if len(self.site_len) != plan.num_recursions or not all(
        1 <= n <= max_len for n in self.site_len):
      raise ValueError(f"DepthwiseEngine: site_len={site_len} must give 1..max_len={max_len} "
                       f"entries for each of the {plan.num_recursions} steps")
    self.offset = tuple(slots * sum(self.site_len[:r]) for r in range(len(self.site_len)))
    super().__init__(model, slots=slots, max_len=max_len, **kw)
    profile = self.profile
    self.block_rows = slots if block_rows is None else block_rows
    if not 1 <= self.block_rows <= slots:
      raise ValueError(f"DepthwiseEngine: block_rows={block_rows} must be in 1..slots={slots}")
    self.width, self.dtype = model.embed.embedding.shape[1], model.embed.dtype
    self.edge_sizes = tuple(sorted(set(edge_sizes or default_edge_sizes(slots))))
    if not 1 <= self.edge_sizes[0] <= self.edge_sizes[-1] <= slots:
      raise ValueError(f"DepthwiseEngine: edge_sizes={edge_sizes} must lie in 1..slots={slots}")
    if profile:
      self._parts = [jax.jit(f, donate_argnums=(1, 2), static_argnames=names) for f, names in
                     ((self._exit_fn, "edge"), (self._entry_fn, ()), (self._core_fn, ()))]
    else:
      self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), static_argnames="edge")

  def init_cache(self, model: LanguageModel) -> Pools:
    """The empty depth-wise cache (Pools) of this engine's slots and site lengths."""
    return depthwise_cache(model, self.slots, self.max_len, self.site_len)

  def serve(self, requests: Sequence[Request],
            on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
    """Every request's completion, in request order (Engine.serve, depth-wise decoding)."""
    self.check(requests)
    start = time.perf_counter()
    queue = collections.deque(range(len(requests)))
    done: dict[int, Completion] = {}
    owner: list[Completion | None] = [None] * self.slots
    s = self.slots
    token_S = np.zeros((s,), np.int32)  # an admitted slot's first token (prefill's)
    enter_S = np.zeros((s,), bool)  # admitted this step: its first token waits for the edge
    index_S = np.zeros((s,), np.int32)  # tokens generated so far: the key's fold-in
    key_S2 = np.zeros((s, 2), np.uint32)
    budget_S = np.ones((s,), np.int32)
    eos_S = np.full((s,), -1, np.int32)
    flight = self._idle_flight()
    exited = 0  # slots whose token left the core in the last step: they wait for the edge

    def finish(c: Completion, token: int) -> bool:
      return _finish(requests[c.request], c, token, start, done, on_finish)

    while queue or any(c is not None for c in owner):
      for slot, c, first in self._fill(requests, queue, owner, start, finish):
        r = requests[c.request]
        token_S[slot], enter_S[slot], index_S[slot] = first, True, 1
        key_S2[slot] = _key_data(r.seed)
        budget_S[slot], eos_S[slot] = r.max_new_tokens, -1 if r.eos is None else r.eos
      if not any(c is not None for c in owner):
        continue
      inputs = (token_S, enter_S, key_S2, index_S, budget_S, eos_S)
      edge = self.edge_size(exited + int(enter_S.sum()))
      if self.profile:
        out = self._profiled_step(flight, inputs, edge)
      else:
        out = self._step(self.state, self.cache, flight, *inputs, edge=edge)
      self.cache, flight, (slot_E, made_E, next_E, depth_E), rows, capped, exited = out
      exited = int(exited)
      slot_E, made_E = np.asarray(slot_E), np.asarray(made_E)
      next_E, depth_E = np.asarray(next_E), np.asarray(depth_E)
      self.stats["engine_steps"] += 1
      self.stats["block_rows"] += int(rows)
      self.stats["capped"] += int(capped)
      self.stats["edge_rows"] += int(made_E.sum())
      enter_S[:] = False
      for i in np.flatnonzero(made_E):
        slot = slot_E[i]
        c = owner[slot]
        c.depth_sum += int(depth_E[i])
        c.depth_tokens += 1
        if finish(c, int(next_E[i])):  # the step already freed the slot (same rule)
          owner[slot] = None
        else:  # its next token entered the model in the same step
          index_S[slot] += 1
    return [done[i] for i in range(len(requests))]

  def compile_steps(self) -> None:
    """Compiles the step at every edge size before a serve needs it, by running it on idle slots:
    nothing waits, so every write is dropped and the cache is unchanged. Twice per size, from a
    fresh flight and from a step's outputs (which may carry another sharding: one more trace)."""
    s = self.slots
    inputs = (np.zeros((s,), np.int32), np.zeros((s,), bool), np.zeros((s, 2), np.uint32),
              np.zeros((s,), np.int32), np.ones((s,), np.int32), np.full((s,), -1, np.int32))
    before = dict(self.stats)
    for edge in self.edge_sizes:
      flight = self._idle_flight()
      for _ in range(2):
        if self.profile:
          out = self._profiled_step(flight, inputs, edge)
        else:
          out = self._step(self.state, self.cache, flight, *inputs, edge=edge)
        self.cache, flight = out[0], out[1]
    jax.block_until_ready(self.cache)
    self.stats.clear()  # the idle steps' timings are no serve's
    self.stats.update(before)

  def _idle_flight(self):
    """A flight with every slot idle (the step's `flight`, _step_fn)."""
    s = self.slots
    return (jnp.zeros((s, self.width), self.dtype), jnp.full((s,), IDLE, jnp.int32),
            jnp.zeros((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
            jnp.zeros((s,), jnp.int32))

  def edge_size(self, pending: int) -> int:
    """The compiled edge size of a step with `pending` slots waiting for the edge: the smallest
    of edge_sizes that holds them all (the largest when none does)."""
    return next((e for e in self.edge_sizes if e >= pending), self.edge_sizes[-1])

  def _profiled_step(self, flight, inputs, edge: int):
    """The step as its three compiled parts, each timed to its results (stats["time/..."])."""
    token_S, enter_S, key_S2, index_S, budget_S, eos_S = inputs
    exit_, entry, core = self._parts
    t0 = time.perf_counter()
    cache, flight, out = jax.block_until_ready(exit_(self.state, self.cache, flight, enter_S,
                                                     key_S2, index_S, budget_S, eos_S,
                                                     edge=edge))
    t1 = time.perf_counter()
    cache, flight, made = jax.block_until_ready(entry(self.state, cache, flight, out, token_S))
    t2 = time.perf_counter()
    cache, flight, rows, capped, exited = jax.block_until_ready(core(self.state, cache, flight))
    t3 = time.perf_counter()
    for part, sec in (("exit", t1 - t0), ("entry", t2 - t1), ("core", t3 - t2)):
      self.stats[f"time/{part}"] += sec
    return cache, flight, made, rows, capped, exited

  def _step_fn(self, state, cache: Pools, flight, token_S: Array, enter_S: Array,
               key_S2: Array, index_S: Array, budget_S: Array, eos_S: Array, *, edge: int):
    """One engine step (class docstring), edge then core: (cache, flight, (edge rows' slots,
    whether each made a token, the token, its depth), rows the shared block ran, tokens capped,
    slots now waiting for the edge). flight = (hidden [S, D], the step each slot's token waits
    for (IDLE, EXITED, ENTER), its gate, steps run, engine steps it has waited unserved)."""
    self.traces[f"step/{edge}"] += 1
    cache, flight, out = self._exit_fn(state, cache, flight, enter_S, key_S2, index_S, budget_S,
                                       eos_S, edge=edge)
    cache, flight, made = self._entry_fn(state, cache, flight, out, token_S)
    cache, flight, rows, capped, exited = self._core_fn(state, cache, flight)
    return cache, flight, made, rows, capped, exited

  def _core_fn(self, state, cache: Pools, flight):
    """Core: block_rows waiting rows at their own steps through the shared block, once; also
    counts the slots whose token now waits for the edge."""
    model = nnx.merge(self.graphdef, state)
    core = model.core
    nr, s = core.plan.num_recursions, self.slots
    x_SD, r_S, w_S, steps_S, wait_S = flight
    waiting_S = r_S >= 0
    # deepest step first, then the longest unserved (no row waits forever), idle slots last
    order = jnp.lexsort((-wait_S, jnp.where(waiting_S, -r_S, nr)))
    idx_R = order[:self.block_rows]
    valid_R, r_R = waiting_S[idx_R], jnp.maximum(r_S[idx_R], 0)
    pos_R = cache.outer.length[idx_R]
    len_R = jnp.asarray(self.site_len, jnp.int32)[r_R]
    n = next(iter(cache.pools.values())).k.shape[0]
    base_R = jnp.asarray(self.offset, jnp.int32)[r_R] + idx_R * len_R
    count_R = cache.counts[r_R, idx_R]
    cols_C = jnp.arange(max(self.site_len), dtype=jnp.int32)
    inside_RC = cols_C[None] < len_R[:, None]
    flat_RC = jnp.where(inside_RC, base_R[:, None] + cols_C[None], 0)
    # the new entry's place in the pool (n: not written, a row that does not run)
    put_R = jnp.where(valid_R, base_R + count_R, n)
    tok_R = Tokens(pos_R[:, None], valid_R[:, None].astype(jnp.int32), count_R[:, None])
    x_R1D = x_SD[idx_R][:, None]
    b = core.plan.num_shared
    reads = {}
    for j in range(b):
      pool = cache.pools[j]
      seg_RC = jnp.where(inside_RC, pool.tok.segments[flat_RC], 0)
      reads[f"row/{j}"] = KV(pool.k[flat_RC], pool.v[flat_RC],
                             Tokens(pool.tok.positions[flat_RC], seg_RC, pool.tok.indices[flat_RC]))
    # each row's step through the core's own loop step (its step's LoRAs and norms, merged)
    y_R1D, out = core.loop_step(x_R1D, tok_R, r_R, Carry(kv=reads),
                                sites=[Site(f"row/{j}") for j in range(b)])
    pools, rows = dict(cache.pools), jnp.arange(self.block_rows)
    for j in range(b):
      pool, new = pools[j], out.kv[f"row/{j}"]
      pools[j] = KV(pool.k.at[put_R].set(new.k[rows, count_R], mode="drop"),
                    pool.v.at[put_R].set(new.v[rows, count_R], mode="drop"),
                    Tokens(*(a.at[put_R].set(b_R1[:, 0], mode="drop") for a, b_R1 in
                             zip(pool.tok, tok_R, strict=True))))
    counts = cache.counts.at[r_R, jnp.where(valid_R, idx_R, s)].add(1, mode="drop")
    # the rule's combine, as its forward does it (MoR: H += g f(H); early exit: the output)
    x_new_RD = routed.scatter(x_R1D, y_R1D, routed.in_place(jnp.ones_like(tok_R.segments, bool)),
                              w_S[idx_R][:, None], core.rule.mode)[:, 0]
    next_R = r_R + 1
    cont_R, w_next_R = core.rule.decide_rows(core, x_new_RD, next_R, model.logits)
    steps_r = jnp.minimum(next_R, nr - 1)
    room_R = (next_R >= nr) | (counts[steps_r, idx_R] < jnp.asarray(self.site_len)[steps_r])
    capped = jnp.sum(valid_R & cont_R & ~room_R, dtype=jnp.int32)
    cont_R = cont_R & room_R
    to_R = jnp.where(valid_R, idx_R, s)
    x_SD = x_SD.at[to_R].set(x_new_RD, mode="drop")
    r_S = r_S.at[to_R].set(jnp.where(cont_R, next_R, EXITED), mode="drop")
    w_S = w_S.at[to_R].set(w_next_R, mode="drop")
    steps_S = steps_S.at[to_R].set(steps_S[idx_R] + 1, mode="drop")
    wait_S = jnp.where(waiting_S | (r_S == EXITED) | (r_S == ENTER), wait_S + 1, 0).at[
        to_R].set(0, mode="drop")
    return (Pools(cache.outer, pools, counts), (x_SD, r_S, w_S, steps_S, wait_S),
            jnp.sum(valid_R, dtype=jnp.int32), capped, jnp.sum(r_S == EXITED, dtype=jnp.int32))

  def _exit_fn(self, state, cache: Pools, flight, enter_S: Array, key_S2: Array,
               index_S: Array, budget_S: Array, eos_S: Array, *, edge: int):
    """Edge, exit half: the slots admitted this step are marked ENTER; up to `edge` slots whose
    token left the core or was just admitted (longest waiting first) are gathered; the exited
    ones run the coda, final norm and head and pick their next token, which ends the request
    (its EOS, or the budget) or enters next."""
    model = nnx.merge(self.graphdef, state)
    x_SD, r_S, w_S, steps_S, wait_S = flight
    r_S = jnp.where(enter_S, ENTER, r_S)
    wait_S = jnp.where(enter_S, 0, wait_S)
    outer = cache.outer
    pending_S = (r_S == EXITED) | (r_S == ENTER)
    idx_E = jnp.lexsort((-wait_S, ~pending_S))[:edge]
    valid_E, r_E = pending_S[idx_E], r_S[idx_E]
    exit_E = valid_E & (r_E == EXITED)
    sites = [n for n in outer.kv if n.startswith("coda/")]
    rows_E = Cache({n: _take(outer.kv[n], idx_E) for n in sites}, outer.depth[idx_E],
                   outer.length[idx_E])
    tok_E = cache_lib.new_tokens(rows_E, None, exit_E[:, None].astype(jnp.int32))
    h_E1D, _, carry = model.coda.forward(x_SD[idx_E][:, None], tok_E, Carry(kv=rows_E.kv))
    next_E = self._pick(model.logits(h_E1D)[:, 0], key_S2[idx_E], index_S[idx_E])
    ends_E = exit_E & ((next_E == eos_S[idx_E]) | (index_S[idx_E] + 1 >= budget_S[idx_E]))
    to_E = jnp.where(exit_E, idx_E, self.slots)
    kv = dict(outer.kv)
    for n in sites:
      kv[n] = _put(kv[n], carry.kv[n], to_E, rows_E.length)
    depth = outer.depth.at[to_E, rows_E.length].set(steps_S[idx_E], mode="drop")
    length = outer.length.at[to_E].add(1, mode="drop")
    r_S = r_S.at[jnp.where(ends_E, idx_E, self.slots)].set(IDLE, mode="drop")
    edge = (idx_E, valid_E & ~ends_E, exit_E, next_E, steps_S[idx_E])
    return (cache._replace(outer=Cache(kv, depth, length)), (x_SD, r_S, w_S, steps_S, wait_S),
            edge)

  def _entry_fn(self, state, cache: Pools, flight, edge, token_S: Array):
    """Edge, entry half: the gathered slots' next tokens (an admitted slot's: prefill's first)
    run the embedding, the prelude and the step-1 router; (cache, flight, (slots, made a token,
    the token, its depth))."""
    model = nnx.merge(self.graphdef, state)
    x_SD, r_S, w_S, steps_S, wait_S = flight
    idx_E, enter_E, exit_E, next_E, depth_E = edge
    outer = cache.outer
    token_E = jnp.where(exit_E, next_E, token_S[idx_E])
    sites = [n for n in outer.kv if n.startswith("prelude/")]
    rows_E = Cache({n: _take(outer.kv[n], idx_E) for n in sites}, outer.depth[idx_E],
                   outer.length[idx_E])
    x_E1D, _, _, carry = model.inputs(token_E[:, None], None, enter_E[:, None].astype(jnp.int32),
                                      rows_E)
    run_E, w0_E = model.core.rule.decide_rows(model.core, x_E1D[:, 0],
                                              jnp.zeros(idx_E.shape, jnp.int32), model.logits)
    run_E = run_E & (cache.counts[0, idx_E] < self.site_len[0])
    to_E = jnp.where(enter_E, idx_E, self.slots)
    kv = dict(outer.kv)
    for n in sites:
      kv[n] = _put(kv[n], carry.kv[n], to_E, rows_E.length)
    x_SD = x_SD.at[to_E].set(x_E1D[:, 0], mode="drop")
    r_S = r_S.at[to_E].set(jnp.where(run_E, 0, EXITED), mode="drop")
    w_S = w_S.at[to_E].set(w0_E, mode="drop")
    steps_S = steps_S.at[to_E].set(0, mode="drop")
    wait_S = wait_S.at[to_E].set(0, mode="drop")
    return (cache._replace(outer=outer._replace(kv=kv)), (x_SD, r_S, w_S, steps_S, wait_S),
            (idx_E, exit_E, next_E, depth_E))

  def _prefill_fn(self, state, cache: Pools, slots_P: Array, tokens_PT: Array, lengths_P: Array,
                  key_P2: Array) -> tuple[Pools, Array, Array, dict]:
    """Engine._prefill_fn into a fresh full-length cache, whose outer sites are scattered to the
    slots' rows and whose core sites are compacted into the slots' pool rows (entries of the
    tokens that ran each step, in order; past a row's site length dropped)."""
    p, t = tokens_PT.shape
    self.traces[f"prefill/{t}"] += 1
    model = nnx.merge(self.graphdef, state)
    core = model.core
    b, s = core.plan.num_shared, self.slots
    rows = model.init_cache(p, self.max_len)
    segments_PT = (jnp.arange(t)[None, :] < lengths_P[:, None]).astype(jnp.int32)
    logits_PTV, aux, rows = model(tokens_PT, segments_BT=segments_PT, cache=rows)
    last_PV = logits_PTV[jnp.arange(p), jnp.maximum(lengths_P - 1, 0)]
    first_P = self._pick(last_PV, key_P2, jnp.zeros((p,), jnp.int32))
    depth_P = jnp.sum(aux["route/depth"] * segments_PT, axis=1)
    outer = Cache(*(jax.tree.map(lambda a, r: a.at[slots_P].set(r, mode="drop"), old, new)
                    for old, new in ((cache.outer.kv, {n: rows.kv[n] for n in cache.outer.kv}),
                                     (cache.outer.depth, rows.depth),
                                     (cache.outer.length, rows.length))))
    real_P = slots_P < s
    pools, counts, dropped = dict(cache.pools), cache.counts, jnp.zeros((), jnp.int32)
    n = next(iter(pools.values())).k.shape[0]  # out of range: not written
    for r, length in enumerate(self.site_len):
      base_P = self.offset[r] + jnp.minimum(slots_P, s - 1) * length
      region_PL = jnp.where(real_P[:, None], base_P[:, None] + jnp.arange(length)[None], n)
      filled_PS = rows.kv[f"{recursion.SITE}/{r * b}"].tok.segments != 0
      rank_PS = jnp.cumsum(filled_PS, axis=1) - 1
      keep_PS = filled_PS & (rank_PS < length) & real_P[:, None]
      dest_PS = jnp.where(keep_PS, base_P[:, None] + rank_PS, n)
      for j in range(b):
        site = rows.kv[f"{recursion.SITE}/{r * b + j}"]
        pool = pools[j]
        # the slot's old entries emptied, then the prompt's written compacted
        seg = pool.tok.segments.at[region_PL].set(0, mode="drop")
        new_tok = site.tok._replace(indices=rank_PS)
        pools[j] = KV(pool.k.at[dest_PS].set(site.k, mode="drop"),
                      pool.v.at[dest_PS].set(site.v, mode="drop"),
                      Tokens(pool.tok.positions.at[dest_PS].set(new_tok.positions, mode="drop"),
                             seg.at[dest_PS].set(new_tok.segments, mode="drop"),
                             pool.tok.indices.at[dest_PS].set(new_tok.indices, mode="drop")))
      filled_P = jnp.sum(filled_PS, axis=1, dtype=jnp.int32)
      counts = counts.at[r, slots_P].set(jnp.minimum(filled_P, length), mode="drop")
      dropped += jnp.sum(jnp.where(real_P, jnp.maximum(filled_P - length, 0), 0))
    return Pools(outer, pools, counts), first_P, depth_P, {"dropped": dropped}


def _take(site: KV, idx_E: Array) -> KV:
  """Rows idx_E of a [S, max_len] site."""
  return jax.tree.map(lambda a: a[idx_E], site)


def _put(site: KV, rows: KV, to_E: Array, col_E: Array) -> KV:
  """`site` with entry col_E[i] of row to_E[i] (out of range: none) set from rows[i]."""
  e = jnp.arange(to_E.shape[0])
  return jax.tree.map(lambda a, r: a.at[to_E, col_E].set(r[e, col_E], mode="drop"), site, rows)
