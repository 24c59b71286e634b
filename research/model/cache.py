"""The decode cache that `LanguageModel.__call__(..., cache=)` reads and returns.

docs/inference.md has the layout with a picture:

  kv     one layers.KV per attention site the forward writes ("prelude/<i>", "core/<depth>",
         "coda/<i>"; LanguageModel.sites): keys/values [B, S, K, Dh] with RoPE applied, each
         token's entry at its position, entry metadata with segment 0 where empty. MoR
         recursion-wise caching writes a token only into the sites of the steps it ran, so a
         step-r query reads exactly the earlier tokens that ran step r; KV sharing has sites for
         step 1's depths only (share_update: every depth, laid over step 1's when read).
  depth  [B, S] int32: recursion steps each cached token ran (MoR; 0 elsewhere), so the engine can
         gather only the rows that continue, and token-choice capacity counts taken slots.
  length [B] int32: tokens held by each row; new tokens go to positions length, length + 1, ...
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from research.model.layers import KV, Tokens, empty_kv

Array = jax.Array


class Cache(NamedTuple):
  """The decoding state of B rows of up to S tokens (module docstring)."""

  kv: dict[str, KV]
  depth: Array
  length: Array

  @property
  def max_len(self) -> int:
    return self.depth.shape[1]


def empty(sites: list[str], batch: int, max_len: int, kv_heads: int, head_dim: int,
          dtype) -> Cache:
  """A cache with nothing in it, one site per name."""
  kv = {name: empty_kv(batch, max_len, kv_heads, head_dim, dtype) for name in sites}
  return Cache(kv, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))


def new_tokens(cache: Cache, positions_BT: Array | None, segments_BT: Array) -> Tokens:
  """The metadata of T new tokens: positions length, length + 1, ... (unless given), indices =
  their entry positions, so causality is by position across the cache."""
  t = segments_BT.shape[1]
  pos_BT = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  return Tokens(pos_BT if positions_BT is None else positions_BT, segments_BT, pos_BT)


def advance(cache: Cache, kv: dict[str, KV], tok: Tokens, depth_BT: Array | None) -> Cache:
  """The cache after a forward over the new tokens `tok`: its sites as the forward left them,
  the new tokens' depths written at their positions, each row longer by its real new tokens."""
  real_BT = tok.segments != 0
  depth = cache.depth
  if depth_BT is not None:
    rows = jnp.arange(depth.shape[0])[:, None]
    depth = depth.at[rows, tok.indices].set(
        jnp.where(real_BT, depth_BT.astype(depth.dtype), depth[rows, tok.indices]))
  return Cache({name: kv[name] for name in cache.kv}, depth,
               cache.length + jnp.sum(real_BT, axis=1, dtype=jnp.int32))
