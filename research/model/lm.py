"""The one language model: embed -> prelude -> core -> coda -> final norm -> LM head.

Methods differ only in the core (recursion.Recursion: a plain stack of unique layers, a tied
recursion, optionally with a MoR routing rule plugged in) and in the FFN slot of a block. The
model returns logits, a flat dict of auxiliary outputs (weighted losses under keys starting with
"loss/", statistics otherwise) and, when decoding, the cache.
"""

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research.model import aux as aux_lib
from research.model import cache as cache_lib
from research.model import moe, recursion, routers
from research.model.cache import Cache
from research.model.layers import (
    NO_CARRY,
    Block,
    Carry,
    Embed,
    RMSNorm,
    Site,
    Tokens,
    constrain_activations,
    normal_init,
)

Array = jax.Array


def resolve_dtype(name: str):
  """'auto' is bfloat16 on accelerators and float32 on CPU (bf16 matmuls are emulated there)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


class Stack(nnx.Module):
  """A sequence of independent blocks (the prelude and the coda), attention site "<name>/<i>"."""

  def __init__(self, blocks: list[Block], *, remat: bool, name: str):
    self.blocks = nnx.List(blocks)
    self.remat = remat
    self.name = name

  def __call__(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict]:
    """(output, the blocks' aux summed by aux.add_aux)."""
    return self.forward(x_BTD, tok)[:2]

  def forward(self, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY
              ) -> tuple[Array, dict, Carry]:
    """(output, summed aux, carry): the carry goes from block to block (layers.Carry)."""
    auxes = []
    for i, block in enumerate(self.blocks):
      fn = lambda blk, x, t, c, i=i: blk.forward(x, t, site=Site(f"{self.name}/{i}"), carry=c)
      x_BTD, aux, carry = (nnx.remat(fn) if self.remat else fn)(block, x_BTD, tok, carry)
      auxes.append(aux)
    return x_BTD, aux_lib.add_aux(auxes), carry

  def sites(self) -> list[str]:
    """The names of the decode-cache entries the blocks write."""
    return [f"{self.name}/{i}" for i in range(len(self.blocks))]


class LanguageModel(nnx.Module):
  """Decoder-only LM (Llama layout). `cfg` is the `model` section of the config."""

  def __init__(self, cfg: mlc.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = resolve_dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    plan = recursion.make_plan(cfg.recursion.strategy, cfg.num_layers,
                               cfg.recursion.num_recursions)
    remat = cfg.remat == "block"

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    routed_ffn = moe.RoutedFFNs(cfg, **kw)

    def blocks(first: int, n: int) -> list[Block]:
      """Unique layers first..first+n-1, routed where moe.is_moe_layer says so."""
      return [Block(cfg, **kw, ffn=routed_ffn(i)) for i in range(first, first + n)]

    self.prelude = Stack(blocks(0, plan.prelude), remat=remat, name="prelude")
    shared = blocks(plan.prelude, plan.num_shared)
    self.core = recursion.Recursion(plan, shared, cfg, remat=remat, param_dtype=param_dtype,
                                    rngs=rngs)
    self.coda = Stack(blocks(plan.prelude + plan.num_shared, plan.coda), remat=remat, name="coda")
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False,
                             kernel_init=normal_init(cfg.init_std, ("embed", "vocab")),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # optimizer steps seen, for ReXMoE's PSR schedule (moe.py); rewritten by the train step
    self.step_counter = (routers.Counter(jnp.zeros((), jnp.int32)) if moe.uses_step(cfg)
                         else None)

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segments_BT: Array | None = None, *, cache: Cache | None = None,
               exits: bool = False) -> tuple[Array | list[Array], dict, Cache | None]:
    """(logits, aux, cache): float32 logits [B, T, V], the aux dict and, when decoding, the cache
    after these tokens (None without one).

    Training and decoding are this one forward. With a `cache` (model/cache.py), the T new tokens
    sit at positions cache.length.. of their rows, every attention writes their keys/values
    into its cache site and reads the whole site, and MoR routes causally (mor.py); prefill and a
    decode step are this call with T = the prompt length and T = 1 (research/infer/decode.py).
    With `exits` (a recursive core), logits is a list, one per loop: the final norm and LM head
    on the hidden state after each loop (RRT §2.4 early exits; the coda runs only on the last),
    the last entry being the usual output. The aux of the prelude, core and coda are merged by
    one rule (aux.add_aux, then aux.mean_over_layers: MoE entries are means over the MoE
    layers)."""
    x_BTD, tok, pre_aux, carry = self.inputs(tokens_BT, positions_BT, segments_BT, cache)
    if exits:
      loops, aux, carry = self.core.loop_outputs(x_BTD, tok, carry)
      x_BTD, coda_aux, carry = self.coda.forward(loops[-1], tok, carry)
      logits = [self.logits(h_BTD) for h_BTD in loops[:-1]] + [self.logits(x_BTD)]
    else:
      x_BTD, aux, carry = self.core.forward(x_BTD, tok, carry, head=self.logits)
      x_BTD, coda_aux, carry = self.coda.forward(x_BTD, tok, carry)
      logits = self.logits(x_BTD)
    aux = aux_lib.mean_over_layers(aux_lib.add_aux([pre_aux, aux, coda_aux]))
    if self.step_counter is not None:
      aux["update/step_counter"] = self.step_counter[...] + 1
    if cache is not None:
      cache = cache_lib.advance(cache, carry.kv, tok, aux.get("route/depth"))
    return logits, aux, cache

  def sites(self) -> list[str]:
    """The attention sites a decode cache holds, in the order the forward writes them."""
    return self.prelude.sites() + self.core.sites() + self.coda.sites()

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty decode cache for `batch` rows of up to `max_len` tokens, in the compute dtype."""
    attn = self.core.blocks[0].attn
    return cache_lib.empty(self.sites(), batch, max_len, attn.num_kv_heads, attn.head_dim,
                           self.embed.dtype)

  def core_inputs(self, tokens_BT: Array, positions_BT: Array | None = None,
                  segments_BT: Array | None = None) -> tuple[Array, Tokens]:
    """The hidden states entering the core and the tokens' metadata (`inputs` without aux)."""
    return self.inputs(tokens_BT, positions_BT, segments_BT)[:2]

  def inputs(self, tokens_BT: Array, positions_BT: Array | None = None,
             segments_BT: Array | None = None, cache: Cache | None = None
             ) -> tuple[Array, Tokens, dict, Carry]:
    """The hidden states entering the core (embedding, then the prelude layers), the tokens'
    metadata (positions default to 0..T-1, or after the cached tokens; segments to one document
    per row), the prelude's aux and the carry leaving it (layers.Carry; the cache's sites and
    depths in it when decoding)."""
    b, t = tokens_BT.shape
    segments_BT = jnp.ones_like(tokens_BT) if segments_BT is None else segments_BT
    if cache is None:
      indices_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      tok = Tokens(positions=indices_BT if positions_BT is None else positions_BT,
                   segments=segments_BT, indices=indices_BT)
      carry = Carry()
    else:
      tok = cache_lib.new_tokens(cache, positions_BT, segments_BT)
      carry = Carry(kv=cache.kv, depth=cache.depth if self.core.rule is not None else None)
    x_BTD = constrain_activations(self.embed(tokens_BT))
    step = None if self.step_counter is None else self.step_counter[...]
    x_BTD, aux, carry = self.prelude.forward(x_BTD, tok, carry._replace(step=step))
    return x_BTD, tok, aux, carry
  def logits(self, x_BTD: Array) -> Array:
    """The exit head: final norm then the (tied or untied) LM head, float32 [B, T, V]."""
    x_BTD = self.norm(x_BTD)
    if self.head is None:
      return self.embed.attend(x_BTD)
    return self.head(x_BTD).astype(jnp.float32)
