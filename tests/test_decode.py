"""KV-cached decoding (research/infer): decode = prefill = the full forward (MoR spec §8 check 9).

For each supported core: prefill on a prompt, then decode_step on the remaining tokens one by one,
gives the logits of one full forward `model(tokens)` at every position (fp32); for MoR, built with
the causal threshold rule (expert choice) so the full forward routes alike, every token's realised
depth equals the forward's Routes.depth. Tiny shapes (d = 32, vocab 64, T = 12); each core's
model and results are built once and shared by the tests that read them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.infer import decode
from research.model.lm import LanguageModel
from tests.model_util import tiny_config, with_mor

T, PROMPT, MAX_LEN = 12, 5, 14  # the cache keeps 2 spare slots: unwritten entries stay unread
THRESHOLD = {"kind": "expert", "impl": "masked", "expert.route": "threshold"}
MC3 = dict(strategy="middle_cycle", num_recursions=3)
MOE = dict(num_experts=4, top_k=2, d_ff=16)  # dropless
GRU = dict(MOE, router="gru", gru_dim=8)

# core name -> (num_layers, model.recursion overrides, model.mor overrides, model.moe overrides)
CORES = {
    "vanilla": (2, {}, {}, {}),
    "cycle_lora_untied_norms": (4, dict(strategy="cycle", num_recursions=2, lora_rank=4,
                                        share_norms=False), {}, {}),
    "sequence": (4, dict(strategy="sequence", num_recursions=2), {}, {}),
    "middle_cycle_merged_lora": (6, dict(strategy="middle_cycle", num_recursions=2, lora_rank=4,
                                         lora_merged=True, share_norms=False), {}, {}),
    "middle_sequence_lora": (6, dict(strategy="middle_sequence", num_recursions=2,
                                     lora_rank=4), {}, {}),
    # c_1 < 1: step 1 routes too; two shared layers per step
    "expert_cache": (8, MC3, dict(THRESHOLD, capacity=(0.75, 0.5, 0.25)), {}),
    "expert_share_aux_router_additive": (5, MC3, dict(THRESHOLD, kv="share", **{
        "expert.sampling": "aux_router", "expert.gating": "additive"}), {}),
    "expert_share_update": (8, MC3, dict(THRESHOLD, kv="share_update"), {}),
    "token_cache_loss_free": (5, MC3, {"kind": "token", "token.balancing": "loss_free"}, {}),
    "token_share_every": (5, MC3, {"kind": "token", "kv": "share", "token.gate": "every",
                                   "token.func": "sigmoid"}, {}),
    # buffers are shares of the row: decoding equals the forward over rows of max_len tokens
    "token_capacity": (5, MC3, {"kind": "token", "token.capacity_factor": 0.8}, {}),
    "expert_lora_untied_norms": (5, dict(MC3, lora_rank=4, share_norms=False),
                                 dict(THRESHOLD, capacity=(1.0, 0.5, 0.25)), {}),
    "expert_moe": (5, MC3, THRESHOLD, MOE),
    "token_rmoe": (5, MC3, {"kind": "token"}, GRU),
    "rmoe": (3, {}, {}, GRU),
    "coe_inner": (3, {}, {}, dict(MOE, iterations=2, coe_residual="inner")),
    "rexmoe_psr": (4, {}, {}, dict(MOE, rex_group=2, psr=True, psr_start=0, psr_end=4)),
    # confidence exits (early_exit.py), tau among this model's exit confidences (~1/36, vocab 64)
    "cycle_early_exit_lora": (3, dict(strategy="cycle", num_recursions=3, lora_rank=4,
                                      early_exit=True, exit_threshold=0.0284), {}, {}),
}
FULL_ROW = {"token_capacity"}  # cores decoded into a cache of exactly T entries


def model_config(layers: int, rec: dict, mor_overrides: dict, moe_overrides: dict):
  """tiny_config with vocab 64 and the given depth, model.recursion, (dotted) model.mor and
  model.moe keys."""
  cfg = tiny_config(num_layers=layers, vocab_size=64)
  cfg.model.recursion.update(rec)
  cfg.model.moe.update(moe_overrides)
  return with_mor(cfg, mor_overrides)


@functools.cache
def build(name: str) -> LanguageModel:
  """The seed-0 model of `name`, its routers scaled so that router logits sit far from the
  threshold (a fresh router's logits are ~1e-2), the loss-free bias non-zero and a PSR step
  counter half-way through its schedule."""
  with nnx.use_eager_sharding(False):
    model = LanguageModel(model_config(*CORES[name]).model, rngs=nnx.Rngs(0))
  core = model.core
  for router in (core.router, core.aux_router):
    if router is not None:
      router.w1[...] = 40 * router.w1[...]
  if core.bias is not None:
    core.bias[...] = jnp.asarray([0.0, -0.02, 0.02])  # depths 1/2/3: 8/12/4 -> 8/5/11
  if model.step_counter is not None:
    model.step_counter[...] = jnp.asarray(2, jnp.int32)
  return model


def is_mor(model: LanguageModel) -> bool:
  return model.core.rule is not None


@nnx.jit
def full_forward(model: LanguageModel, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """model(tokens) logits and, for MoR, each token's depth (zeros otherwise)."""
  logits_BTV, aux, _ = model(tokens_BT)
  return logits_BTV, aux.get("route/depth", jnp.zeros(tokens_BT.shape, jnp.int32))


def tokens(seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (2, T), 0, 64)


@functools.cache
def decoded(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(full-forward logits, decoded logits, forward depth, decoded depth) on `tokens()`."""
  model, tokens_BT = build(name), tokens()
  want, want_depth = full_forward(model, tokens_BT)
  max_len = T if name in FULL_ROW else MAX_LEN
  logits, cache = decode.prefill(model, tokens_BT[:, :PROMPT], decode.init_cache(model, 2, max_len))
  got = [logits]
  for i in range(PROMPT, T):
    logits_BV, cache = decode.decode_step(model, tokens_BT[:, i], cache)
    got.append(logits_BV[:, None])
  np.testing.assert_array_equal(cache.length, [T, T])
  return (np.asarray(want), np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want_depth),
          np.asarray(decode.depth(cache)))


@pytest.mark.parametrize("name", list(CORES))
def test_prefill_then_decode_equals_the_full_forward(name):
  want, got, want_depth, got_depth = decoded(name)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if is_mor(build(name)):
    np.testing.assert_array_equal(got_depth[:, :T], want_depth)
    assert (got_depth[:, T:] == 0).all()  # spare slots never written
    nr = build(name).core.plan.num_recursions
    assert len(np.unique(want_depth)) >= 2 and want_depth.max() <= nr  # tokens really exit


def test_expert_threshold_rule_exits_tokens_at_every_step():
  """The causal rule really routes: with c_1 < 1 some tokens skip even step 1 (depth 0), and
  some run every step."""
  _, _, depth, _ = decoded("expert_cache")
  assert (depth == 0).any() and (depth == 3).any()


def test_recursion_wise_cache_sites_hold_exactly_the_tokens_that_ran_their_step():
  """kv=cache (§3.1): the site of step r's first depth has an entry at a position iff that token
  ran step r, and the cache's depth says the same."""
  model = build("expert_cache")
  _, cache = decode.prefill(model, tokens()[:, :PROMPT], decode.init_cache(model, 2, MAX_LEN))
  depth = np.asarray(cache.depth)
  b = model.core.plan.num_shared
  for r in range(model.core.plan.num_recursions):
    filled = np.asarray(cache.kv[f"core/{r * b}"].tok.segments) != 0
    np.testing.assert_array_equal(filled, depth >= r + 1)
  assert (depth[:, :PROMPT] < 3).any() and (depth[:, PROMPT:] == 0).all()


def test_unwritten_cache_entries_are_never_read():
  """A cache whose slots start as garbage decodes alike: a query reads only positions written
  before it (and, per MoR step, only the tokens that ran it)."""
  model, tokens_BT = build("expert_cache"), tokens()
  want, _, _, _ = decoded("expert_cache")
  cache = decode.init_cache(model, 2, MAX_LEN)
  noise = lambda a, i: 1e3 * jax.random.normal(jax.random.key(i), a.shape, a.dtype)
  cache = cache._replace(kv={name: kv._replace(k=noise(kv.k, i), v=noise(kv.v, -i - 1))
                             for i, (name, kv) in enumerate(sorted(cache.kv.items()))})
  logits, cache = decode.prefill(model, tokens_BT[:, :PROMPT], cache)
  logits_BV, _ = decode.decode_step(model, tokens_BT[:, PROMPT], cache)
  np.testing.assert_allclose(logits, want[:, :PROMPT], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits_BV, want[:, PROMPT], atol=1e-5, rtol=1e-5)


def test_greedy_generate_is_deterministic_and_equals_argmax_decoding():
  model, prompt = build("expert_cache"), tokens()[:, :PROMPT]
  out = np.asarray(decode.generate(model, prompt, 4))
  assert out.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(decode.generate(model, prompt, 4)), out)
  logits, cache = decode.prefill(model, prompt, decode.init_cache(model, 2, PROMPT + 4))
  token = jnp.argmax(logits[:, -1], axis=-1)
  for i in range(3):
    np.testing.assert_array_equal(token, out[:, i])
    logits_BV, cache = decode.decode_step(model, token, cache)
    token = jnp.argmax(logits_BV, axis=-1)
  np.testing.assert_array_equal(token, out[:, 3])


def test_sampling_needs_a_key_and_repeats_with_the_same_key():
  model, prompt = build("vanilla"), tokens()[:, :PROMPT]
  with pytest.raises(ValueError, match=r"explicit jax\.random key"):
    decode.generate(model, prompt, 4, temperature=1.0)
  sample = lambda seed: np.asarray(decode.generate(model, prompt, 4, temperature=5.0,
                                                   key=jax.random.key(seed)))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))  # near-uniform at temperature 5


def test_bad_inputs_raise_errors_naming_the_key():
  model = build("vanilla")
  with pytest.raises(ValueError, match="max_len=4"):
    decode.prefill(model, tokens()[:, :5], decode.init_cache(model, 2, 4))
  with pytest.raises(ValueError, match="max_len=6"):
    decode.generate(model, tokens()[:, :5], 2, max_len=6)


def test_generate_config_errors_name_the_key():
  for key, value in [("num_tokens", 0), ("temperature", -1.0), ("prompt", ""),
                     ("num_samples", 0)]:
    cfg = tiny_config()
    cfg.generate[key] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.generate\.{key}="):
      config_lib.validate(cfg)
