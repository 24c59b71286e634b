"""KV-cached autoregressive decoding (shared/specs/mor.md §2.5, §3.1-3.2; §8 check 9).

  cache = decode.init_cache(model, batch=2, max_len=64)
  logits_BTV, cache = decode.prefill(model, prompt_BT, cache)  # positions 0..T-1
  logits_BV, cache = decode.decode_step(model, token_B, cache)  # position T, then T+1, ...
  tokens_BN = decode.generate(model, prompt_BT, 16)  # greedy; temperature=, key= to sample

One pass, `extend`, serves both prefill (T prompt tokens) and decoding (T = 1): the model's own
modules (embedding, blocks with their LoRA and norms, MoR routers, final norm and head) run on the
new tokens, and each block's self-attention is replaced (Block's `attend` hook) by attention over
a static-shape cache that the new tokens' keys/values are first written into.

Cache layout: one K/V pair [B, max_len, K, Dh] per attention call site, RoPE applied, each token's
entry at its position; a query at position p reads the entries at positions <= p.
  prelude / coda: one site per block. Stack core: one per block. Recursion: one per unrolled
  depth (each depth has its own inputs, LoRA and norms).
  MoR kv=cache (§3.1): one per (step r, shared layer); only the entries of tokens that ran step r
  are read (`ran[r]`), so a token at step r attends to the earlier tokens that ran step r and
  to itself. kv=share (§3.2): one per shared layer, written at step 1 (which every token runs)
  and read by every later step of the same layer.
  ran [Nr, B, max_len]: the token at a position ran MoR step r; its sum over r is the token's
  realised depth (`depth`).

MoR routing is causal (§2.5): expert choice uses the threshold rule whatever the run trained with
(a token runs step r iff it ran step r - 1 and sigma(s_r) > 0.5, the aux router's s when there
is one; a step of capacity 1 passes every token: mor.threshold_route), gated as in mor.py; token
choice takes the top-1 depth of its router on the core input (plus the loss-free bias). A model
built with model.mor.expert.route='threshold' (impl='masked') gives the same logits and depths in
its full forward, which tests/test_decode.py checks for every supported core.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from research.config import ConfigError
from research.model import mor, recursion, routers
from research.model.layers import Attend, Tokens, constrain_activations, dot_product_attention
from research.model.lm import LanguageModel

Array = jax.Array


class Cache(NamedTuple):
  """The decoding state of a batch whose rows all hold `length` tokens (one document each)."""

  k: tuple[Array, ...]  # one [B, max_len, K, Dh] per attention call site, RoPE applied
  v: tuple[Array, ...]  # same shapes
  ran: Array  # [Nr, B, max_len] bool: the token ran MoR step r ([0, B, max_len] without MoR)
  length: Array  # [] int32: positions 0..length-1 are filled


def check_supported(model: LanguageModel) -> None:
  """Raises ConfigError (a ValueError) naming the config key of a core decoding cannot run."""
  if any(isinstance(node, routers.RecurrentRouter) for _, node in nnx.iter_graph(model)):
    raise ConfigError("config.model.moe.router='gru': decoding does not carry the RMoE router "
                      "state from block to block yet")
  if model.step_counter is not None:
    raise ConfigError("config.model.moe.psr=True: decoding does not apply the PSR mask yet")
  core = model.core
  if not isinstance(core, mor.MoR):
    return
  c = core.cfg
  if c.kv == "share_update":
    raise ConfigError("config.model.mor.kv='share_update': decoding supports 'cache' and "
                      "'share' (the hybrid overwrites shared K/V per step, never cached)")
  if c.kind == "token" and c.token.capacity_factor > 0:
    raise ConfigError(f"config.model.mor.token.capacity_factor={c.token.capacity_factor}: "
                      "token-choice buffers are a share of the row length, which decoding does "
                      "not know; decoding needs 0 (every token runs its chosen depth)")


def core_sites(core: nnx.Module) -> int:
  """Attention call sites of the core (see the module docstring)."""
  if isinstance(core, mor.MoR) and core.cfg.kv == "share":
    return core.plan.num_shared
  if isinstance(core, mor.MoR | recursion.Recursion):
    return len(core.plan.order)
  return len(core.blocks)


def init_cache(model: LanguageModel, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens, in the compute dtype."""
  check_supported(model)
  attn = model.core.blocks[0].attn
  sites = len(model.prelude.blocks) + core_sites(model.core) + len(model.coda.blocks)
  shape = (batch, max_len, attn.num_kv_heads, attn.head_dim)
  steps = model.core.plan.num_recursions if isinstance(model.core, mor.MoR) else 0
  return Cache(k=tuple(jnp.zeros(shape, model.embed.dtype) for _ in range(sites)),
               v=tuple(jnp.zeros(shape, model.embed.dtype) for _ in range(sites)),
               ran=jnp.zeros((steps, batch, max_len), bool), length=jnp.zeros((), jnp.int32))


class Pass:
  """One `extend` pass: the new tokens' positions and the cache as its sites get written."""

  def __init__(self, cache: Cache, t: int):
    b = cache.ran.shape[1]
    self.start = cache.length
    self.pos_BT = cache.length + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    self.k, self.v, self.ran = list(cache.k), list(cache.v), list(cache.ran)
    self.no_steps = cache.ran[:0]  # the [0, B, max_len] `ran` of a core without MoR
    self.next_site = 0

  def tokens(self) -> Tokens:
    """The new tokens' metadata: one document per row, positions after the cached ones."""
    return Tokens(positions=self.pos_BT, segments=jnp.ones_like(self.pos_BT), indices=self.pos_BT)

  def attend(self, step: int | None = None, read: int | None = None) -> Attend:
    """Attention over the next call site after writing the new tokens' K/V into it, or (`read`)
    over site `read` as it stands (KV sharing). `step`: only keys that ran MoR step `step`."""
    if read is None:
      site, self.next_site = self.next_site, self.next_site + 1
    else:
      site = read

    def attend(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array) -> Array:
      if read is None:
        self.k[site] = self.write(self.k[site], k_BTKD)
        self.v[site] = self.write(self.v[site], v_BTKD)
      k_BSKD, v_BSKD = self.k[site], self.v[site]
      mask_BTS = jnp.arange(k_BSKD.shape[1])[None, None, :] <= self.pos_BT[:, :, None]
      if step is not None:
        mask_BTS &= self.ran[step][:, None, :]
      return dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS)

    return attend

  def write(self, cache_BS: Array, new_BT: Array) -> Array:
    """cache with the new tokens' entries at their positions."""
    start = (0, self.start) + (0,) * (cache_BS.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BS, new_BT.astype(cache_BS.dtype), start)

  def mark(self, step: int, ran_BT: Array) -> None:
    """Records which new tokens run MoR step `step` (before its attention reads ran[step])."""
    self.ran[step] = self.write(self.ran[step], ran_BT)

  def cache(self) -> Cache:
    """The cache after the pass."""
    ran = jnp.stack(self.ran) if self.ran else self.no_steps
    return Cache(tuple(self.k), tuple(self.v), ran, self.start + self.pos_BT.shape[1])


def extend(model: LanguageModel, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
  """Float32 logits [B, T, V] of T new tokens at positions length..length+T-1, and the cache
  holding them. Prefill and decode_step are this pass at T = prompt length and T = 1."""
  p = Pass(cache, tokens_BT.shape[1])
  tok = p.tokens()
  x_BTD = constrain_activations(model.embed(tokens_BT))
  for block in model.prelude.blocks:
    x_BTD = block(x_BTD, tok, attend=p.attend())
  x_BTD = core_pass(model.core, x_BTD, tok, p)
  for block in model.coda.blocks:
    x_BTD = block(x_BTD, tok, attend=p.attend())
  return model.logits(x_BTD), p.cache()


def core_pass(core: nnx.Module, x_BTD: Array, tok: Tokens, p: Pass) -> Array:
  """The core on the new tokens: every block / depth in order, or MoR's routed steps."""
  if isinstance(core, mor.MoR):
    return mor_pass(core, x_BTD, tok, p)
  if isinstance(core, recursion.Recursion):  # per-depth LoRA (a merged LoRA is the same sum)
    for depth in range(len(core.plan.order)):
      block, lora, norms = core.at_depth(depth)
      x_BTD = block(x_BTD, tok, lora, norms, p.attend())
    return x_BTD
  for block in core.blocks:
    x_BTD = block(x_BTD, tok, attend=p.attend())
  return x_BTD


def mor_pass(core: mor.MoR, x_BTD: Array, tok: Tokens, p: Pass) -> Array:
  """MoR's masked full-length path (mor.MoR.expert_choice with route='threshold', token_choice)
  over the new tokens, each step's blocks attending through the cache."""
  first = p.next_site  # kv=share: step 1's sites, read by the later steps

  def step(r: int, x_BTD: Array) -> Array:
    b = core.plan.num_shared
    for layer, j in enumerate(core.plan.order[r * b:(r + 1) * b]):
      shared = core.cfg.kv == "share" and r > 0
      attend = p.attend(step=0, read=first + layer) if shared else p.attend(step=r)
      x_BTD = core.blocks[j](x_BTD, tok, attend=attend)
    return x_BTD

  nr = core.plan.num_recursions
  if core.cfg.kind == "expert":
    ran_BT = jnp.ones(x_BTD.shape[:2], bool)
    for r in range(nr):
      _, _, rule_BT, w_BT = core.expert_scores(x_BTD, r)
      ran_BT = mor.threshold_route(ran_BT, rule_BT, core.capacity[r])
      p.mark(r, ran_BT)
      x_BTD = mor.gated_add(x_BTD, step(r, x_BTD), w_BT, ran_BT)
    return x_BTD
  _, _, choice_BT, gate_BT = core.token_route(x_BTD)
  depth_BT = choice_BT + 1
  state_BTD = x_BTD
  for r in range(nr):
    active_BT = depth_BT >= r + 1
    p.mark(r, active_BT)
    state_BTD = mor.token_update(core.cfg.token.gate, r, state_BTD, x_BTD, step(r, state_BTD),
                                 gate_BT, depth_BT, active_BT)
  return state_BTD


_extend = nnx.jit(extend)


def prefill(model: LanguageModel, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
  """Logits [B, T, V] of a prompt (positions cache.length.., 0.. for a fresh cache) in one pass
  that fills the caches."""
  t, max_len = tokens_BT.shape[1], cache.ran.shape[2]
  if t > max_len:
    raise ValueError(f"prefill: the prompt has {t} tokens, more than the cache holds "
                     f"(max_len={max_len})")
  return _extend(model, tokens_BT, cache)


def decode_step(model: LanguageModel, token_B: Array, cache: Cache) -> tuple[Array, Cache]:
  """Logits [B, V] of one new token per row at position cache.length (which must be below
  max_len: a full cache is not detected inside jit), and the cache holding it."""
  logits_B1V, cache = _extend(model, token_B[:, None], cache)
  return logits_B1V[:, 0], cache


def depth(cache: Cache) -> Array:
  """MoR: recursion steps run by the token at each position [B, max_len] (0 beyond length)."""
  return jnp.sum(cache.ran, axis=0, dtype=jnp.int32)


def pick(logits_BV: Array, temperature: float, key: Array) -> Array:
  """argmax (temperature 0), else a sample from softmax(logits / temperature)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


def generate(model: LanguageModel, prompt_BT: Array, num_tokens: int, *,
             temperature: float = 0.0, key: Array | None = None,
             max_len: int | None = None) -> Array:
  """num_tokens tokens [B, N] after the prompt: prefill, then decode_step on each picked token.
  temperature 0 is greedy; > 0 samples with the explicit jax.random `key` (token i uses
  fold_in(key, i)). max_len (default prompt + num_tokens) sizes the cache."""
  b, t = prompt_BT.shape
  max_len = t + num_tokens if max_len is None else max_len
  if num_tokens < 1:
    raise ValueError(f"generate: num_tokens={num_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"generate: temperature={temperature} must be >= 0 (0: greedy)")
  if temperature > 0 and key is None:
    raise ValueError("generate: sampling (temperature > 0) needs an explicit jax.random key")
  if t + num_tokens > max_len:
    raise ValueError(f"generate: the prompt ({t} tokens) plus num_tokens={num_tokens} exceed "
                     f"max_len={max_len}")
  cache = init_cache(model, b, max_len)
  key = jax.random.key(0) if key is None else key  # unused when greedy
  return _generate(model, jnp.asarray(prompt_BT, jnp.int32), cache, key, num_tokens=num_tokens,
                   temperature=float(temperature))


@functools.partial(nnx.jit, static_argnames=("num_tokens", "temperature"))
def _generate(model: LanguageModel, prompt_BT: Array, cache: Cache, key: Array, *,
              num_tokens: int, temperature: float) -> Array:
  logits_BTV, cache = extend(model, prompt_BT, cache)
  first_B = pick(logits_BTV[:, -1], temperature, jax.random.fold_in(key, 0))

  def body(carry, i):
    token_B, cache = carry
    logits_B1V, cache = extend(model, token_B[:, None], cache)
    return (pick(logits_B1V[:, 0], temperature, jax.random.fold_in(key, i)), cache), token_B

  (last_B, _), tokens_NB = jax.lax.scan(body, (first_B, cache), jnp.arange(1, num_tokens))
  return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)
