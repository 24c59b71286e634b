"""The request-level engine (research/infer/engine.py): continuous batching over cache slots.

For each model kind (tiny: d = 32, vocab 64, untied head), one engine serves the same requests
(prompt lengths 3, 6 and 11, budgets 1..8, some stopping at an EOS token) in two arrival orders;
every request's greedy output equals `decode.generate` on that request alone (same max_len), and
the engine compiled one decode step and one prefill per bucket it used, whatever the order. Slot
counts and prefill batch sizes differ between the models (1..4 slots). The depth-wise engine
(MoR expert choice, recursion-wise caches) is held to the same outputs, and its shared-block row
count to the routing decisions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.infer import decode
from research.infer import engine as engine_lib
from research.model.lm import LanguageModel
from tests.test_decode import MC3, MOE, THRESHOLD, model_config

MAX_LEN, BUCKETS, BUDGET = 20, (8, 16), 8
# name -> (num_layers, model.recursion, model.mor, model.moe overrides, slots, prefill batch)
MODELS = {
    "vanilla": (2, {}, {}, {}, 1, 1),
    "relaxed": (4, dict(strategy="cycle", num_recursions=2, lora_rank=4, share_norms=False),
                {}, {}, 2, 2),
    "expert_cache": (5, MC3, dict(THRESHOLD, capacity=(0.75, 0.5, 0.25)), {}, 3, 2),
    "expert_share": (5, MC3, dict(THRESHOLD, kv="share"), {}, 4, 1),
    "token": (5, MC3, {"kind": "token"}, {}, 3, 3),
    "moe": (2, {}, {}, MOE, 2, 1),
    # a recursive model served with confidence exits (early_exit.py), relaxed: its LoRAs and
    # untied norms random (build), so the depth-wise engine's merged LoRAs are really exercised;
    # tau sits among this model's loop-1 exit confidences (tests check that tokens exit at
    # every loop). Depth-wise only: the sequence-wise engine is the model's forward with a
    # cache, held to the full forward for this core in test_decode.py.
    "exit_relaxed": (3, dict(strategy="cycle", num_recursions=3, lora_rank=4, share_norms=False,
                             early_exit=True, exit_threshold=0.0198), {}, {}, 3, 2),
}
SEQUENCE_WISE = [n for n in MODELS if n != "exit_relaxed"]
LENGTHS = (3, 6, 11, 3, 6, 11, 3)  # prompt length of request i: buckets 8, 8 and 16
BUDGETS = (8, 5, 8, 1, 8, 3, 7)


@functools.cache
def build(name: str) -> LanguageModel:
  """The seed-0 model of `name` with an untied head, its routers scaled (as in test_decode) so
  tokens exit at different depths."""
  layers, rec, mor, moe, _, _ = MODELS[name]
  cfg = model_config(layers, rec, mor, moe)
  cfg.model.tie_embeddings = False  # tied, a random tiny model greedily repeats its last token
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  core = model.core
  if core.router is not None:
    core.router.w1[...] = 40 * core.router.w1[...]
  keys = iter(jax.random.split(jax.random.key(7), 32))
  if core.lora is not None:  # B = 0 at init: make the per-depth LoRAs differ
    for n in core.lora.names:
      b = getattr(core.lora, f"{n}_b")
      b[...] = 0.3 * jax.random.normal(next(keys), b.shape, b.dtype)
  if core.attn_norms is not None:
    for norms in (core.attn_norms, core.ffn_norms):
      norms[...] = 1 + 0.2 * jax.random.normal(next(keys), norms.shape, norms.dtype)
  return model


@functools.cache
def engine(name: str) -> engine_lib.Engine:
  *_, slots, prefill_batch = MODELS[name]
  return engine_lib.Engine(build(name), slots=slots, max_len=MAX_LEN, buckets=BUCKETS,
                           prefill_batch=prefill_batch)


def prompts() -> list[list[int]]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 64, n).tolist() for n in LENGTHS]


@functools.cache
def references(name: str) -> list[list[int]]:
  """decode.generate's greedy BUDGET tokens for each prompt alone (cache of MAX_LEN entries)."""
  model = build(name)
  return [np.asarray(decode.generate(model, jnp.asarray([p]), BUDGET, max_len=MAX_LEN))[0]
          .tolist() for p in prompts()]


def requests(name: str) -> list[engine_lib.Request]:
  """The prompts with BUDGETS; requests 1 and 4 stop at the EOS token their reference generates
  third (unless it came earlier)."""
  ref = references(name)
  return [engine_lib.Request(p, b, eos=ref[i][2] if i in (1, 4) else None)
          for i, (p, b) in enumerate(zip(prompts(), BUDGETS, strict=True))]


@nnx.jit
def _prefill_depths(model: LanguageModel, tokens_1S: jax.Array, segments_1S: jax.Array):
  _, _, cache = model(tokens_1S, segments_BT=segments_1S, cache=model.init_cache(1, MAX_LEN))
  return decode.depth(cache)[0]


def recorded_depths(model: LanguageModel, seq: list[int]) -> np.ndarray:
  """The recursion steps a prefill of `seq` into an empty cache records for each token (one
  compilation: seq right-padded to MAX_LEN with segment 0)."""
  tokens_1S = np.zeros((1, MAX_LEN), np.int32)
  tokens_1S[0, :len(seq)] = seq
  segments_1S = (np.arange(MAX_LEN) < len(seq))[None].astype(np.int32)
  return np.asarray(_prefill_depths(model, jnp.asarray(tokens_1S), jnp.asarray(segments_1S)))[
      :len(seq)]


def expected(req: engine_lib.Request, ref: list[int]) -> list[int]:
  """The reference cut at the budget and after the first EOS."""
  out = ref[:req.max_new_tokens]
  return out[:out.index(req.eos) + 1] if req.eos in out else out


@pytest.mark.parametrize("name", SEQUENCE_WISE)
def test_greedy_output_equals_generate_alone_under_any_arrival_order(name):
  eng, reqs, ref = engine(name), requests(name), references(name)
  for order in (range(len(reqs)), [6, 2, 4, 0, 5, 1, 3]):
    order = list(order)
    done = eng.serve([reqs[i] for i in order])
    for c, i in zip(done, order, strict=True):
      want = expected(reqs[i], ref[i])
      assert c.tokens == want, (name, order, i)
      assert c.finish == ("eos" if reqs[i].eos in want else "length")
  assert any(c.finish == "eos" for c in done)
  # compiled once: one decode step and one prefill per bucket, across both orders
  assert dict(eng.traces) == {"decode": 1, "prefill/8": 1, "prefill/16": 1}


def test_a_finished_request_frees_its_slot_for_the_next_at_once():
  """One slot: every decode step serves a request (no idle step between requests), so there are
  sum(tokens - 1) decode steps and one prefill per request, admitted in arrival order."""
  eng = engine("vanilla")
  before = dict(eng.stats)
  done = eng.serve(requests("vanilla"))
  steps = eng.stats["decode_steps"] - before.get("decode_steps", 0)
  assert steps == sum(len(c.tokens) - 1 for c in done)
  assert eng.stats["prefill_calls"] - before.get("prefill_calls", 0) == len(done)
  starts = [c.start_s for c in done]
  assert starts == sorted(starts) and all(c.end_s >= c.start_s for c in done)


def test_slots_run_requests_concurrently():
  """Four slots, prefill one request per step: the decode steps hold up to four rows at once,
  fewer steps than one slot needs."""
  eng = engine("expert_share")
  before = dict(eng.stats)
  done = eng.serve(requests("expert_share"))
  steps = eng.stats["decode_steps"] - before.get("decode_steps", 0)
  rows = eng.stats["decode_rows"] - before.get("decode_rows", 0)
  assert rows == sum(len(c.tokens) - 1 for c in done)
  assert steps < rows and rows <= 4 * steps


def test_mean_depth_is_the_cached_tokens_recursion_steps():
  """MoR: a completion's mean depth is the mean of decode.depth over the tokens it ran through
  the model (the prompt and its generated tokens but the last), as a plain prefill of them
  records."""
  model, eng, reqs = build("expert_cache"), engine("expert_cache"), requests("expert_cache")
  done = eng.serve(reqs)
  depths = []
  for c, r in zip(done[:2], reqs[:2], strict=True):
    seq = list(r.prompt) + c.tokens[:-1]
    want = recorded_depths(model, seq)
    assert c.depth_tokens == len(seq)
    np.testing.assert_allclose(c.mean_depth, want.mean())
    depths.append(c.mean_depth)
  assert 0 < min(depths) and max(depths) < 3  # tokens exit early


def test_sampling_equals_generate_with_the_requests_key():
  """temperature 1, top-p 0.9: request i with seed s samples as decode.generate with
  jax.random.key(s); the same seed repeats, another differs."""
  model = build("vanilla")
  eng = engine_lib.Engine(model, slots=2, max_len=MAX_LEN, buckets=(4, 16), temperature=1.0,
                          top_p=0.9)
  ps = [prompts()[i] for i in (0, 3, 0)]  # 3 tokens each: one prefill bucket
  reqs = [engine_lib.Request(p, BUDGET, seed=s) for p, s in zip(ps, (3, 4, 5), strict=True)]
  done = eng.serve(reqs)
  for c, r in zip(done, reqs, strict=True):
    want = decode.generate(model, jnp.asarray([r.prompt]), BUDGET, temperature=1.0, top_p=0.9,
                           key=jax.random.key(r.seed), max_len=MAX_LEN)
    assert c.tokens == np.asarray(want)[0].tolist()
  assert done[2].tokens != done[0].tokens  # same prompt, another seed
  assert eng.serve([reqs[0]])[0].tokens == done[0].tokens
  assert dict(eng.traces) == {"decode": 1, "prefill/4": 1}


def test_reset_slots_empties_only_the_chosen_rows():
  model = build("expert_cache")
  cache = decode.init_cache(model, 3, MAX_LEN)
  _, cache = decode.prefill(model, jnp.asarray([prompts()[1]] * 3), cache)
  out = engine_lib.reset_slots(cache, jnp.asarray([False, True, False]))
  np.testing.assert_array_equal(out.length, [6, 0, 6])
  assert (np.asarray(out.depth[1]) == 0).all() and (np.asarray(out.depth[0]) > 0).any()
  for name, site in out.kv.items():
    seg = np.asarray(site.tok.segments)
    assert (seg[1] == 0).all(), name
    np.testing.assert_array_equal(seg[[0, 2]], np.asarray(cache.kv[name].tok.segments)[[0, 2]])
  assert (np.asarray(out.kv["core/0"].tok.positions[1]) == 0).all()


def test_requests_that_do_not_fit_are_refused_naming_them():
  eng = engine("vanilla")
  with pytest.raises(ValueError, match=r"request 1: its prompt \(17 tokens\).*max_len=20"):
    eng.serve([engine_lib.Request([1, 2], 2), engine_lib.Request([1] * 17, 1)])
  with pytest.raises(ValueError, match="request 0: needs a prompt"):
    eng.serve([engine_lib.Request([], 2)])
  with pytest.raises(ValueError, match=r"request 0: its prompt \(3 tokens\) plus "
                     r"max_new_tokens=18"):
    eng.serve([engine_lib.Request([1, 2, 3], 18)])
  with pytest.raises(ValueError, match="buckets"):
    engine_lib.Engine(build("vanilla"), slots=1, max_len=8, buckets=(4, 16))
  assert engine_lib.default_buckets(100) == (16, 32, 64, 100)
  assert engine_lib.default_buckets(64) == (16, 32, 64)


DEPTHWISE = ("expert_cache", "exit_relaxed")  # MoR expert choice; confidence exit, relaxed


@functools.cache
def depthwise(name: str = "expert_cache") -> engine_lib.DepthwiseEngine:
  """Depth-wise batching of `name`: 3 slots, the shared block on 2 rows."""
  return engine_lib.DepthwiseEngine(build(name), slots=3, max_len=MAX_LEN,
                                    buckets=BUCKETS, prefill_batch=2, block_rows=2,
                                    edge_sizes=(1, 3))


@pytest.mark.parametrize("name", DEPTHWISE)
def test_depthwise_greedy_output_equals_generate_alone_under_any_arrival_order(name):
  eng, reqs, ref = depthwise(name), requests(name), references(name)
  for order in (range(len(reqs)), [6, 2, 4, 0, 5, 1, 3]):
    order = list(order)
    done = eng.serve([reqs[i] for i in order])
    for c, i in zip(done, order, strict=True):
      assert c.tokens == expected(reqs[i], ref[i]), (order, i)
  # one trace per edge size (both used: the step picks the size by the slots waiting for the
  # edge) and per prefill bucket, across both orders
  assert dict(eng.traces) == {"step/1": 1, "step/3": 1, "prefill/8": 1, "prefill/16": 1}


@pytest.mark.parametrize("name", DEPTHWISE)
def test_depthwise_block_rows_are_the_routing_decisions(name):
  """The shared block ran exactly one row per (generated token fed back, recursion step it ran):
  the sum of the depths decode.prefill records for those tokens (the steps or loops each ran);
  never more than 2 rows a step; fewer than the sequence-wise engine's in-place rows x Nr; the
  fed tokens' depths span 1..Nr (the exit rule: every loop). For MoR each completion's mean
  depth equals the sequence-wise engine's."""
  model, eng, reqs = build(name), depthwise(name), requests(name)
  before = dict(eng.stats)
  done = eng.serve(reqs)
  rows = eng.stats["block_rows"] - before.get("block_rows", 0)
  steps = eng.stats["engine_steps"] - before.get("engine_steps", 0)
  want, depths = 0, []
  for c, r in zip(done, reqs, strict=True):
    seq = list(r.prompt) + c.tokens[:-1]
    depths += recorded_depths(model, seq)[len(r.prompt):].tolist()
  want = sum(depths)
  assert rows == want and rows <= 2 * steps
  fed = sum(len(c.tokens) - 1 for c in done)
  assert 0 < rows < 3 * fed
  if name == "exit_relaxed":
    assert {1, 3} <= set(depths)  # tokens exit after loop 1 and run every loop
    return
  sequential = engine("expert_cache").serve(reqs)
  for c, s in zip(done, sequential, strict=True):
    assert c.tokens == s.tokens
    np.testing.assert_allclose(c.mean_depth, s.mean_depth)


def test_depthwise_sampling_equals_generate_with_the_requests_key():
  model = build("expert_cache")
  eng = engine_lib.DepthwiseEngine(model, slots=2, max_len=MAX_LEN, buckets=(4, 16),
                                   edge_sizes=(2,),
                                   temperature=1.0, top_p=0.9)
  reqs = [engine_lib.Request(prompts()[i], BUDGET, seed=s) for i, s in ((0, 3), (3, 4), (0, 5))]
  for c, r in zip(eng.serve(reqs), reqs, strict=True):
    want = decode.generate(model, jnp.asarray([r.prompt]), BUDGET, temperature=1.0, top_p=0.9,
                           key=jax.random.key(r.seed), max_len=MAX_LEN)
    assert c.tokens == np.asarray(want)[0].tolist()


def test_depthwise_refuses_models_it_cannot_batch_across_depths_naming_the_key():
  for name, key in (("vanilla", "model.mor.kind"), ("token", "model.mor.kind"),
                    ("relaxed", "model.mor.kind"),  # recursive without an exit threshold
                    ("expert_share", "model.mor.kv")):
    with pytest.raises(ValueError, match=rf"config\.{key}: must be"):
      engine_lib.DepthwiseEngine(build(name), slots=2, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="block_rows=3"):
    engine_lib.DepthwiseEngine(build("expert_cache"), slots=2, max_len=MAX_LEN, block_rows=3)
  with pytest.raises(ValueError, match=r"edge_sizes=\(1, 4\) must lie in 1\.\.slots=2"):
    engine_lib.DepthwiseEngine(build("expert_cache"), slots=2, max_len=MAX_LEN, edge_sizes=(1, 4))


def test_the_edge_size_is_the_smallest_that_holds_the_waiting_slots():
  assert engine_lib.default_edge_sizes(32) == (8, 16, 32)
  assert engine_lib.default_edge_sizes(3) == (1, 2, 3) and engine_lib.default_edge_sizes(1) == (1,)
  eng = depthwise()  # edge sizes (1, 3)
  assert [eng.edge_size(n) for n in (0, 1, 2, 3)] == [1, 1, 3, 3]


def test_compile_steps_compiles_every_edge_size_and_leaves_the_cache_as_it_was():
  """After compile_steps no serve compiles a step (a serve alone may never reach every edge
  size), the idle steps changed no cache entry, and the outputs are generate's."""
  eng = engine_lib.DepthwiseEngine(build("expert_cache"), slots=3, max_len=MAX_LEN,
                                   buckets=BUCKETS, prefill_batch=2, block_rows=2,
                                   edge_sizes=(1, 2, 3))
  fresh = jax.tree.map(np.asarray, eng.cache)
  eng.compile_steps()
  assert {k: v for k, v in eng.traces.items() if k.startswith("step/")} == {
      "step/1": 1, "step/2": 1, "step/3": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, eng.cache), fresh)
  assert not eng.stats
  reqs, ref = requests("expert_cache")[:3], references("expert_cache")[:3]
  for c, r, want in zip(eng.serve(reqs), reqs, ref, strict=True):
    assert c.tokens == expected(r, want)
  assert {k: v for k, v in eng.traces.items() if k.startswith("step/")} == {
      "step/1": 1, "step/2": 1, "step/3": 1}


def test_depthwise_compacted_pools_equal_generate_without_overflow_and_cap_with_it():
  """compact=True sizes step r's pool rows by the capacity, ceil(c_r max_len): with max_len 40
  (rows of 30, 20 and 10 entries) no request of <= 19 tokens overflows, and the outputs equal
  generate alone in less cache memory; with rows of 20, 3 and 1 entries (site_len) some tokens
  are capped (they exit before a step whose row is full) or prompt entries dropped, and every
  request is still served."""
  model, reqs, ref = build("expert_cache"), requests("expert_cache"), references("expert_cache")
  roomy = engine_lib.DepthwiseEngine(model, slots=3, max_len=40, buckets=BUCKETS, edge_sizes=(3,),
                                     prefill_batch=2, compact=True)
  assert roomy.site_len == (30, 20, 10)
  full = engine_lib.depthwise_cache(model, 3, 40, (40, 40, 40))
  assert engine_lib.cache_bytes(roomy.cache) < engine_lib.cache_bytes(full)
  done = roomy.serve(reqs)
  assert roomy.stats["capped"] == 0 and roomy.stats["dropped"] == 0
  for c, r, want in zip(done, reqs, ref, strict=True):
    assert c.tokens == expected(r, want)
  tight = engine_lib.DepthwiseEngine(model, slots=3, max_len=MAX_LEN, buckets=BUCKETS,
                                     edge_sizes=(1,),
                                     prefill_batch=2, site_len=(20, 3, 1))
  done = tight.serve(reqs)
  assert tight.stats["capped"] + tight.stats["dropped"] > 0
  assert all(1 <= len(c.tokens) <= r.max_new_tokens for c, r in zip(done, reqs, strict=True))
