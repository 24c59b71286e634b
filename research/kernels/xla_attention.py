"""The XLA attention path, arrays only (docs/kernels.md): a masked einsum softmax, and its
block-causal form for self-attention over tokens whose indices ascend along each row.

    out = softmax(mask(q k^T / sqrt(Dh))) v,  grouped kv heads, float32 logits and softmax,

with routed_attention's mask (research/kernels/routed_attention.py: attention_mask). A query that
may read no key gives 0. This is research/model/layers.py's dot_product_attention and
block_causal_attention taking index and segment arrays instead of Tokens.
"""

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


def xla_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array, q_seg_BT: Array,
                  kv_idx_BS: Array, kv_seg_BS: Array, *, causal: bool, cross_segments: bool,
                  sorted_self_attention: bool = False) -> Array:
  """routed_attention's semantics through XLA einsums. `sorted_self_attention=True` promises the
  keys are the queries' own tokens (kv_idx = q_idx, kv_seg = q_seg) with indices ascending along
  each row; with `causal` it then runs block-causal (about half the T x T work)."""
  if sorted_self_attention and q_BTHD.shape[1] != k_BSKD.shape[1]:
    raise ValueError(f"xla_attention: sorted_self_attention needs the same tokens for queries "
                     f"and keys, got T = {q_BTHD.shape[1]} and S = {k_BSKD.shape[1]}")
  if sorted_self_attention and causal:
    return block_causal_attention(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT,
                                  cross_segments=cross_segments,
                                  block=causal_block(q_BTHD.shape[1]))
  mask_BTS = attention_mask(q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal=causal,
                            cross_segments=cross_segments)
  return masked_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS)
