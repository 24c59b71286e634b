"""KV-cached autoregressive decoding through the model's own forward (docs/inference.md).

  cache = decode.init_cache(model, batch=2, max_len=64)
  logits_BTV, cache = decode.prefill(model, prompt_BT, cache)  # positions 0..T-1
  logits_BV, cache = decode.decode_step(model, token_B, cache)  # position T, then T+1, ...
  tokens_BN = decode.generate(model, prompt_BT, 16)  # greedy; temperature=, key= to sample

Prefill and a decode step are `model(tokens, cache=cache)` (LanguageModel.__call__) with T = the
prompt length and T = 1: there is no second walk over the model here. The cache layout is in
research/model/cache.py; MoR routes causally when decoding (research/model/mor.py: expert choice
by the threshold rule, token choice by its top-1 depth), so a model built with
model.mor.expert.route='threshold' (impl='masked') gives the same logits and depths in its full
forward, which tests/test_decode.py checks for every core and FFN. Token-choice capacity buffers
are shares of the cache's max_len: decoding equals the forward over rows of max_len tokens.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.cache import Cache
from research.model.lm import LanguageModel

Array = jax.Array


def init_cache(model: LanguageModel, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (LanguageModel.init_cache)."""
  return model.init_cache(batch, max_len)


@nnx.jit
def _forward(model: LanguageModel, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
  logits_BTV, _, cache = model(tokens_BT, cache=cache)
  return logits_BTV, cache


def prefill(model: LanguageModel, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
  """Logits [B, T, V] of a prompt (after the cached tokens: positions 0.. for a fresh cache) in
  one forward that fills the caches."""
  t = tokens_BT.shape[1]
  if t > cache.max_len:
    raise ValueError(f"prefill: the prompt has {t} tokens, more than the cache holds "
                     f"(max_len={cache.max_len})")
  return _forward(model, tokens_BT, cache)


def decode_step(model: LanguageModel, token_B: Array, cache: Cache) -> tuple[Array, Cache]:
  """Logits [B, V] of one new token per row at position cache.length (which must be below
  max_len: a full cache is not detected inside jit), and the cache holding it."""
  logits_B1V, cache = _forward(model, token_B[:, None], cache)
  return logits_B1V[:, 0], cache


def depth(cache: Cache) -> Array:
  """MoR: recursion steps run by the token at each position [B, max_len] (0 beyond length)."""
  return cache.depth


def pick(logits_BV: Array, temperature: float, key: Array, top_p: float = 1.0) -> Array:
  """argmax (temperature 0), else a sample from softmax(logits / temperature) restricted to the
  nucleus (Holtzman et al. 2020): the likeliest tokens whose probabilities, in decreasing order,
  first reach top_p (always at least the likeliest one; top_p 1 keeps every token)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  scaled_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1:
    order_BV = jnp.argsort(-scaled_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the likelier tokens
    sorted_BV = jnp.where(mass_before_BV < top_p, sorted_BV, -jnp.inf)
    scaled_BV = jnp.full_like(scaled_BV, -jnp.inf).at[
        jnp.arange(scaled_BV.shape[0])[:, None], order_BV].set(sorted_BV)
  return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)


def generate(model: LanguageModel, prompt_BT: Array, num_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, key: Array | None = None,
             max_len: int | None = None) -> Array:
  """num_tokens tokens [B, N] after the prompt: prefill, then decode_step on each picked token.
  temperature 0 is greedy; > 0 samples (within the top_p nucleus, `pick`) with the explicit
  jax.random `key` (token i uses fold_in(key, i)). max_len (default prompt + num_tokens) sizes
  the cache."""
  b, t = prompt_BT.shape
  max_len = t + num_tokens if max_len is None else max_len
  if num_tokens < 1:
    raise ValueError(f"generate: num_tokens={num_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"generate: temperature={temperature} must be >= 0 (0: greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (1: no nucleus cut)")
  if temperature > 0 and key is None:
    raise ValueError("generate: sampling (temperature > 0) needs an explicit jax.random key")
  if t + num_tokens > max_len:
    raise ValueError(f"generate: the prompt ({t} tokens) plus num_tokens={num_tokens} exceed "
                     f"max_len={max_len}")
  cache = init_cache(model, b, max_len)
  key = jax.random.key(0) if key is None else key  # unused when greedy
  return _generate(model, jnp.asarray(prompt_BT, jnp.int32), cache, key, num_tokens=num_tokens,
                   temperature=float(temperature), top_p=float(top_p))


@functools.partial(nnx.jit, static_argnames=("num_tokens", "temperature", "top_p"))
def _generate(model: LanguageModel, prompt_BT: Array, cache: Cache, key: Array, *,
              num_tokens: int, temperature: float, top_p: float) -> Array:
  logits_BTV, _, cache = model(prompt_BT, cache=cache)
  first_B = pick(logits_BTV[:, -1], temperature, jax.random.fold_in(key, 0), top_p)

  def body(carry, i):
    token_B, cache = carry
    logits_B1V, _, cache = model(token_B[:, None], cache=cache)
    token_B = pick(logits_B1V[:, 0], temperature, jax.random.fold_in(key, i), top_p)
    return (token_B, cache), carry[0]

  (last_B, _), tokens_NB = jax.lax.scan(body, (first_B, cache), jnp.arange(1, num_tokens))
  return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)
