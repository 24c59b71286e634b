"""The XLA attention path, arrays only (docs/kernels.md): a masked einsum softmax, and its
causal block-skipping forms.

    out = softmax(mask(q k^T / sqrt(Dh))) v,  grouped kv heads, float32 logits and softmax,

with routed_attention's mask (research/kernels/routed_attention.py: attention_mask). A query that
may read no key gives 0.

Causal block skipping, in query blocks of `causal_block(T)`, when the caller promises an order:
- sorted self-attention (queries and keys the same tokens, indices ascending): query block
  [s, e) reads keys [0, e);
- sorted queries over the row's keys (MoR KV sharing: key j has index j, S keys; the T queries
  have distinct ascending indices, so query i's index is at most S - T + i): query block [s, e)
  reads keys [0, S - T + e).
On GPU / TPU each block is the masked einsum softmax over its keys (`block_causal_attention`,
`prefix_causal_attention`). On CPU the blocks go through `flash_attention`: one custom VJP over
all blocks (the row's log-sum-exp kept, the backward recomputes the probabilities and uses
D = rowsum(dO * O), FlashAttention-2's form), query heads of a kv head folded into the rows of
one batched matmul, K pre-transposed, the mask an additive bias, and the blocks run one after the
other (docs/kernels.md has the measurements).
"""

import functools

import jax
import jax.numpy as jnp

from research.kernels.routed_attention import attention_mask

Array = jax.Array


def masked_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_BTS: Array) -> Array:
  """softmax(q k^T / sqrt(Dh) + mask) v with grouped kv heads; logits and softmax in float32,
  the probabilities cast to v's dtype for the second einsum; rows with no readable key give 0."""
  b, t, h, dh = q_BTHD.shape
  kv_heads = k_BSKD.shape[2]
  q_BTKGD = (q_BTHD * dh**-0.5).reshape(b, t, kv_heads, h // kv_heads, dh)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD)
  out_BTKGD = jnp.where(jnp.any(mask_BTS, axis=-1)[:, :, None, None, None], out_BTKGD, 0)
  return out_BTKGD.reshape(b, t, h, dh).astype(q_BTHD.dtype)


def causal_block(t: int) -> int:
  """Query block of block_causal_attention for rows of t tokens: t / 8, at least 32."""
  return max(32, -(-t // 8))


def block_causal_attention(q_BTHD: Array, k_BTKD: Array, v_BTKD: Array, idx_BT: Array,
                           seg_BT: Array, *, cross_segments: bool, block: int) -> Array:
  """masked_attention(q, k, v, causal self-attention mask) in query blocks.

  Self-attention only (q, k, v of the same tokens), indices ascending along each row (padding,
  segment 0, aside): every key after a query's position is masked, so query block [s, e) reads
  keys [0, e) and the blocks above the diagonal are never computed.
  """
  mask_BTS = attention_mask(idx_BT, seg_BT, idx_BT, seg_BT, causal=True,
                            cross_segments=cross_segments)
  t = q_BTHD.shape[1]
  outs = [masked_attention(q_BTHD[:, s:s + block], k_BTKD[:, :s + block], v_BTKD[:, :s + block],
                           mask_BTS[:, s:s + block, :s + block]) for s in range(0, t, block)]
  return jnp.concatenate(outs, axis=1)


def key_ends(t: int, s: int, block: int, *, row_keys: bool) -> tuple[int, ...]:
  """The keys [0, end) each query block [i block, (i + 1) block) of t queries reads: e for
  sorted self-attention (s = t), S - T + e for sorted queries over the row's s keys."""
  ends = range(block, t + block, block)
  return tuple(min(s, s - t + e) if row_keys else min(e, t) for e in ends)


def prefix_causal_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array,
                            q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *,
                            cross_segments: bool, block: int) -> Array:
  """masked_attention(q, k, v, causal mask) in query blocks, for T sorted queries over the row's
  S keys (key j has index j; the queries' indices distinct and ascending): query block [s, e)
  reads keys [0, S - T + e) only, every key after them being later than each of its queries."""
  mask_BTS = attention_mask(q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal=True,
                            cross_segments=cross_segments)
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  ends = key_ends(t, s, block, row_keys=True)
  outs = [masked_attention(q_BTHD[:, i * block:(i + 1) * block], k_BSKD[:, :end],
                           v_BSKD[:, :end], mask_BTS[:, i * block:(i + 1) * block, :end])
          for i, end in enumerate(ends)]
  return jnp.concatenate(outs, axis=1)


_NEG = -1e30  # additive bias of a masked score; a finite -inf (no inf - inf)


def _after(x, dep):
  """x, made to depend on `dep` (x + 0 * one element of it): XLA:CPU runs independent ops at
  once, and attention blocks that overlap fight for the two cores and the caches. A non-finite
  `dep` makes x non-finite (the step is then skipped anyway)."""
  z = sum(jnp.ravel(d)[0] for d in jax.tree.leaves(dep)) * 0
  return jax.tree.map(lambda a: a + z.astype(a.dtype), x)


def _block_bias(q_idx_BN: Array, q_seg_BN: Array, kv_idx_BE: Array, kv_seg_BE: Array,
                cross_segments: bool) -> Array:
  """[B, 1, N, 1, E] float32: 0 where the query may read the key (attention_mask), else -1e30;
  broadcast over kv heads and the query heads of each."""
  mask = attention_mask(q_idx_BN, q_seg_BN, kv_idx_BE, kv_seg_BE, causal=True,
                        cross_segments=cross_segments)
  return jnp.where(mask, 0.0, _NEG)[:, None, :, None, :]


def _flash_forward(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block):
  """(out [B, K, R, Dh], lse [B, K, R, 1]) over rows r = t G + g, block by block. A row that
  may read no key gets out 0 and lse +1e30 (its probabilities exp(s - lse) are then 0)."""
  q_idx, q_seg, kv_idx, kv_seg = meta
  b, kh, r = q_BKRD.shape[:3]
  t = q_idx.shape[1]
  g = r // t
  kT_BKDS = jnp.swapaxes(k_BKSD, 2, 3)
  outs, lses = [], []
  for i, end in enumerate(ends):
    s0, e = i * block, min((i + 1) * block, t)
    q_b = q_BKRD[:, :, s0 * g:e * g]
    if outs:
      q_b = _after(q_b, outs[-1])
    bias = _block_bias(q_idx[:, s0:e], q_seg[:, s0:e], kv_idx[:, :end], kv_seg[:, :end],
                       cross_segments)
    s = jnp.einsum("bkrd,bkds->bkrs", q_b, kT_BKDS[..., :end]).reshape(b, kh, e - s0, g, end)
    s = s + bias
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    o = jnp.einsum("bkrs,bksd->bkrd", p.reshape(b, kh, (e - s0) * g, end), v_BKSD[:, :, :end])
    valid = (m > _NEG / 2).reshape(b, kh, (e - s0) * g, 1)
    denom = jnp.sum(p, axis=-1, keepdims=True).reshape(valid.shape)
    outs.append(jnp.where(valid, o / denom, 0.0))
    lses.append(jnp.where(valid, m.reshape(valid.shape) + jnp.log(denom), -_NEG))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block):
  return _flash_forward(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block)[0]


def _flash_fwd(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block):
  out, lse = _flash_forward(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block)
  return out, (q_BKRD, k_BKSD, v_BKSD, meta, out, lse)


def _flash_bwd(cross_segments, ends, block, res, do_BKRD):
  """p = exp(s - lse), dp = dO V^T, ds = p (dp - rowsum(dO O)); dq = ds K, dk = ds^T q,
  dv = p^T dO, block by block (ds and p transposed once for the last two)."""
  q_BKRD, k_BKSD, v_BKSD, meta, out, lse = res
  q_idx, q_seg, kv_idx, kv_seg = meta
  b, kh, r = q_BKRD.shape[:3]
  t = q_idx.shape[1]
  g = r // t
  kT_BKDS, vT_BKDS = jnp.swapaxes(k_BKSD, 2, 3), jnp.swapaxes(v_BKSD, 2, 3)
  delta = jnp.sum(do_BKRD * out, axis=-1, keepdims=True)
  dk, dv, dqs = jnp.zeros_like(k_BKSD), jnp.zeros_like(v_BKSD), []
  for i, end in enumerate(ends):
    s0, e = i * block, min((i + 1) * block, t)
    rows = slice(s0 * g, e * g)
    q_b, do_b = q_BKRD[:, :, rows], do_BKRD[:, :, rows]
    if dqs:
      q_b, do_b = _after((q_b, do_b), (dqs[-1], dk, dv))
    bias = _block_bias(q_idx[:, s0:e], q_seg[:, s0:e], kv_idx[:, :end], kv_seg[:, :end],
                       cross_segments)
    s = jnp.einsum("bkrd,bkds->bkrs", q_b, kT_BKDS[..., :end]).reshape(b, kh, e - s0, g, end)
    s = (s + bias).reshape(b, kh, (e - s0) * g, end)
    p = jnp.exp(s - lse[:, :, rows])
    dp = jnp.einsum("bkrd,bkds->bkrs", do_b, vT_BKDS[..., :end])
    ds = p * (dp - delta[:, :, rows])
    dqs.append(jnp.einsum("bkrs,bksd->bkrd", ds, k_BKSD[:, :, :end]))
    dsT = jax.lax.optimization_barrier(jnp.swapaxes(ds, 2, 3))
    pT = jax.lax.optimization_barrier(jnp.swapaxes(p, 2, 3))
    dk = dk.at[:, :, :end].add(jnp.einsum("bksr,bkrd->bksd", dsT, q_b))
    dv = dv.at[:, :, :end].add(jnp.einsum("bksr,bkrd->bksd", pT, do_b))
  zeros = jax.tree.map(lambda a: None, meta)
  return jnp.concatenate(dqs, axis=2), dk, dv, zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array,
                    q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *, cross_segments: bool,
                    ends: tuple[int, ...], block: int) -> Array:
  """masked_attention(q, k, v, causal mask) where query block i (queries [i block, (i + 1)
  block)) reads only keys [0, ends[i]) (every later key is masked for each of its queries: the
  caller's promise, `key_ends`). One custom VJP, float32 inside (module docstring)."""
  b, t, h, dh = q_BTHD.shape
  kh = k_BSKD.shape[2]
  q_BKRD = (q_BTHD.astype(jnp.float32) * dh**-0.5).reshape(b, t, kh, h // kh, dh)
  q_BKRD = q_BKRD.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * (h // kh), dh)
  k_BKSD = k_BSKD.astype(jnp.float32).transpose(0, 2, 1, 3)
  v_BKSD = v_BSKD.astype(jnp.float32).transpose(0, 2, 1, 3)
  meta = (q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS)
  out = _flash(q_BKRD, k_BKSD, v_BKSD, meta, cross_segments, ends, block)
  out = out.reshape(b, kh, t, h // kh, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh)
  return out.astype(q_BTHD.dtype)


def xla_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array, q_seg_BT: Array,
                  kv_idx_BS: Array, kv_seg_BS: Array, *, causal: bool, cross_segments: bool,
                  sorted_self_attention: bool = False, sorted_queries_row_keys: bool = False
                  ) -> Array:
  """routed_attention's semantics through XLA einsums. With `causal`, two promises skip the
  key blocks after each query block (about half the T x S work):
  `sorted_self_attention=True`: the keys are the queries' own tokens (kv_idx = q_idx,
    kv_seg = q_seg) with indices ascending along each row (padding aside);
  `sorted_queries_row_keys=True`: the keys are the row's S tokens in index order (kv_idx[b, j]
    = j) and every query slot, padding included, has a distinct index, ascending along the row.
  On CPU these run through `flash_attention`, elsewhere through the masked blocks."""
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  if sorted_self_attention and t != s:
    raise ValueError(f"xla_attention: sorted_self_attention needs the same tokens for queries "
                     f"and keys, got T = {t} and S = {s}")
  if sorted_queries_row_keys and t > s:
    raise ValueError(f"xla_attention: sorted_queries_row_keys needs at most S = {s} queries, "
                     f"got T = {t}")
  if causal and (sorted_self_attention or sorted_queries_row_keys):
    block = causal_block(t)
    if jax.default_backend() == "cpu":
      ends = key_ends(t, s, block, row_keys=not sorted_self_attention)
      return flash_attention(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS,
                             cross_segments=cross_segments, ends=ends, block=block)
    if sorted_self_attention:
      return block_causal_attention(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT,
                                    cross_segments=cross_segments, block=block)
    return prefix_causal_attention(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS,
                                   kv_seg_BS, cross_segments=cross_segments, block=block)
  mask_BTS = attention_mask(q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal=causal,
                            cross_segments=cross_segments)
  return masked_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS)
