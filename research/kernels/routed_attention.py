"""Routed attention: flash attention over token subsets, masked by original indices and segments
(docs/kernels.md).

    out[b, i, h] = sum_j softmax_j(s_bhij) v[b, j, h // G],
    s_bhij = Dh^-1/2 q[b, i, h] . k[b, j, h // G],

over the keys j that query i may read (mask_bij):
    q_seg[i] != 0 and kv_seg[j] != 0 and (not causal or kv_idx[j] <= q_idx[i])
    and (cross_segments or q_seg[i] == kv_seg[j]).
A query that may read no key gives exactly 0. Logits and softmax in float32, output in q's dtype.
This is research/model/layers.py's attention_mask + dot_product_attention, with arrays only:
queries may be a gathered subset of a row's tokens (q_idx their original indices) and keys the
same subset, the full row, or a decode cache whose unfilled slots have kv_seg 0.

Kernels (generic Pallas API; the same kernel bodies for the Triton and the Mosaic TPU lowering,
interpret mode on CPU):
- `_fwd_kernel`, grid (B, H, T / bq): online softmax over the kv blocks this q block visits
  (running max m, sum l, float32 accumulator), writes out and lse = m + log l.
- `_dq_kernel`, grid (B, H, T / bq): recomputes p = exp(s - lse) per visited kv block and
  accumulates dq = Dh^-1/2 sum_j p (dp - delta) k, dp = do . v, delta = sum(do * out).
- `_dkv_kernel`, grid (B, H, S / bk): for one kv block, loops over the q blocks that read it and
  accumulates dv = p^T do and dk = Dh^-1/2 ds^T q per query head (summed over the G heads of
  each kv head afterwards).
Block visits come from metadata computed before the call from the data (`_visits`): the pair
(q block, kv block) is visited unless it is provably all-masked (no valid query or key; causal
and the kv block's smallest valid index exceeds the q block's largest; or, without
cross_segments, disjoint segment ranges). It is correct for any order and skips the blocks above
the diagonal when indices ascend.

`routed_attention_reference` is the plain masked softmax the kernels are tested against.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

_MASKED = -1e30  # a finite -inf: masked scores and the running max start here (no inf - inf)


def routed_attention_reference(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array,
                               q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *,
                               causal: bool, cross_segments: bool) -> Array:
  """Plain masked softmax(q k^T / sqrt(Dh)) v with grouped kv heads, float32 logits; rows with
  no readable key give 0."""
  b, t, h, dh = q_BTHD.shape
  kv_heads = k_BSKD.shape[2]
  mask_BTS = attention_mask(q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal=causal,
                            cross_segments=cross_segments)
  q_BTKGD = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, dh)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                      preferred_element_type=jnp.float32) * dh**-0.5
  logits = jnp.where(mask_BTS[:, None, None], logits, -jnp.inf)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True, initial=_MASKED))
  probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-30)
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD.astype(jnp.float32))
  return out_BTKGD.reshape(b, t, h, dh).astype(q_BTHD.dtype)


def attention_mask(q_idx_BT: Array, q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *,
                   causal: bool, cross_segments: bool) -> Array:
  """mask[b, i, j]: query i may read key j (no padding, causal by index, same segment)."""
  mask_BTS = (q_seg_BT[:, :, None] != 0) & (kv_seg_BS[:, None, :] != 0)
  if causal:
    mask_BTS &= kv_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
  if not cross_segments:
    mask_BTS &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
  return mask_BTS


# ----------------------------------------------------------------------------------------------
# Block-visit metadata.


class _Visits(NamedTuple):
  """kv blocks visited by each q block (`kv_list` [B, nq, nk], the first `kv_count` [B, nq]
  entries valid, ascending) and q blocks visiting each kv block (`q_list` [B, nk, nq],
  `q_count` [B, nk])."""

  kv_list: Array
  kv_count: Array
  q_list: Array
  q_count: Array


def _block_stats(idx_BN: Array, seg_BN: Array, block: int):
  """Per block of valid (seg != 0) entries: (any valid, min idx, max idx, min seg, max seg)."""
  b, n = idx_BN.shape
  valid = (seg_BN != 0).reshape(b, n // block, block)
  idx = idx_BN.reshape(valid.shape)
  seg = seg_BN.reshape(valid.shape)
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
  return (valid.any(-1), jnp.where(valid, idx, big).min(-1), jnp.where(valid, idx, small).max(-1),
          jnp.where(valid, seg, big).min(-1), jnp.where(valid, seg, small).max(-1))


def _visits(q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, *, causal: bool, cross_segments: bool,
            block_q: int, block_k: int) -> _Visits:
  """Which (q block, kv block) pairs may hold a readable pair (conservative, from the data)."""
  q_any, _, q_max, q_seg_min, q_seg_max = _block_stats(q_idx_BT, q_seg_BT, block_q)
  k_any, k_min, _, k_seg_min, k_seg_max = _block_stats(kv_idx_BS, kv_seg_BS, block_k)
  live_BQK = q_any[:, :, None] & k_any[:, None, :]
  if causal:
    live_BQK &= k_min[:, None, :] <= q_max[:, :, None]
  if not cross_segments:
    live_BQK &= ((k_seg_min[:, None, :] <= q_seg_max[:, :, None])
                 & (q_seg_min[:, :, None] <= k_seg_max[:, None, :]))

  def compact(live_BXY):
    # The live blocks' ids first, in ascending order (a stable sort on "not live").
    order = jnp.argsort(~live_BXY, axis=-1, stable=True).astype(jnp.int32)
    return order, live_BXY.sum(-1).astype(jnp.int32)

  kv_list, kv_count = compact(live_BQK)
  q_list, q_count = compact(jnp.swapaxes(live_BQK, 1, 2))
  return _Visits(kv_list, kv_count, q_list, q_count)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs of one program: q-side blocks (bq, .), kv-side stacks (nk, bk, .) indexed by the
# visited block, so every dynamic index is on a leading dimension (Triton and Mosaic alike).


def _mask(q_idx_Q1, q_seg_Q1, kv_idx_1K, kv_seg_1K, *, causal: bool, cross_segments: bool):
  mask_QK = (q_seg_Q1 != 0) & (kv_seg_1K != 0)
  if causal:
    mask_QK &= kv_idx_1K <= q_idx_Q1
  if not cross_segments:
    mask_QK &= q_seg_Q1 == kv_seg_1K
  return mask_QK


def _nt_dot(a_XD, b_YD):
  """a b^T in float32."""
  return jax.lax.dot_general(a_XD, b_YD, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _tn_dot(a_XY, b_XD):
  """a^T b in float32."""
  return jax.lax.dot_general(a_XY, b_XD, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _fwd_kernel(kv_list_ref, kv_count_ref, q_ref, k_ref, v_ref, q_idx_ref, q_seg_ref, kv_idx_ref,
                kv_seg_ref, out_ref, lse_ref, *, scale: float, causal: bool,
                cross_segments: bool):
  """Online softmax of one q block over its visited kv blocks:
  m' = max(m, max_j s_j), l' = e^{m - m'} l + sum_j e^{s_j - m'}, acc' = e^{m - m'} acc + p v."""
  b, qi = pl.program_id(0), pl.program_id(2)
  q_QD = q_ref[...]
  q_idx_Q1, q_seg_Q1 = q_idx_ref[...], q_seg_ref[...]
  bq, dh = q_QD.shape

  def visit(t, carry):
    m_Q1, l_Q1, acc_QD = carry
    j = kv_list_ref[b, qi, t]
    mask_QK = _mask(q_idx_Q1, q_seg_Q1, kv_idx_ref[j], kv_seg_ref[j], causal=causal,
                    cross_segments=cross_segments)
    s_QK = jnp.where(mask_QK, _nt_dot(q_QD, k_ref[j]) * scale, _MASKED)
    m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    p_QK = jnp.where(mask_QK, jnp.exp(s_QK - m_new_Q1), 0.0)
    alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
    v_KD = v_ref[j]
    acc_QD = alpha_Q1 * acc_QD + jnp.dot(p_QK.astype(v_KD.dtype), v_KD,
                                         preferred_element_type=jnp.float32)
    return m_new_Q1, alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True), acc_QD

  init = (jnp.full((bq, 1), _MASKED, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, dh), jnp.float32))
  m_Q1, l_Q1, acc_QD = jax.lax.fori_loop(0, kv_count_ref[b, qi], visit, init)
  some_Q1 = l_Q1 > 0
  out_ref[...] = jnp.where(some_Q1, acc_QD / jnp.where(some_Q1, l_Q1, 1.0), 0.0).astype(
      out_ref.dtype)
  # +inf for a row that reads nothing: exp(s - lse) = 0 in the backward.
  lse_ref[...] = jnp.where(some_Q1, m_Q1 + jnp.log(jnp.where(some_Q1, l_Q1, 1.0)), jnp.inf)


def _dq_kernel(kv_list_ref, kv_count_ref, q_ref, k_ref, v_ref, q_idx_ref, q_seg_ref, kv_idx_ref,
               kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, causal: bool,
               cross_segments: bool):
  """dq_i = scale sum_j p_ij (dp_ij - delta_i) k_j, p = exp(s - lse), dp = do . v."""
  b, qi = pl.program_id(0), pl.program_id(2)
  q_QD, do_QD = q_ref[...], do_ref[...]
  q_idx_Q1, q_seg_Q1 = q_idx_ref[...], q_seg_ref[...]
  lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]

  def visit(t, dq_QD):
    j = kv_list_ref[b, qi, t]
    mask_QK = _mask(q_idx_Q1, q_seg_Q1, kv_idx_ref[j], kv_seg_ref[j], causal=causal,
                    cross_segments=cross_segments)
    k_KD = k_ref[j]
    p_QK = jnp.where(mask_QK, jnp.exp(_nt_dot(q_QD, k_KD) * scale - lse_Q1), 0.0)
    ds_QK = p_QK * (_nt_dot(do_QD, v_ref[j]) - delta_Q1)
    return dq_QD + jnp.dot(ds_QK.astype(k_KD.dtype), k_KD, preferred_element_type=jnp.float32)

  dq_QD = jax.lax.fori_loop(0, kv_count_ref[b, qi], visit, jnp.zeros(q_QD.shape, jnp.float32))
  dq_ref[...] = (dq_QD * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_list_ref, q_count_ref, q_ref, k_ref, v_ref, q_idx_ref, q_seg_ref, kv_idx_ref,
                kv_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float,
                causal: bool, cross_segments: bool):
  """For one kv block and query head: dv_j = sum_i p_ij do_i, dk_j = scale sum_i ds_ij q_i with
  ds = p (dp - delta), over the q blocks that read it (scores computed transposed, s^T = k q^T)."""
  b, kj = pl.program_id(0), pl.program_id(2)
  k_KD, v_KD = k_ref[...], v_ref[...]
  kv_idx_K1, kv_seg_K1 = kv_idx_ref[...], kv_seg_ref[...]

  def visit(t, carry):
    dk_KD, dv_KD = carry
    i = q_list_ref[b, kj, t]
    mask_KQ = _mask(q_idx_ref[i], q_seg_ref[i], kv_idx_K1, kv_seg_K1, causal=causal,
                    cross_segments=cross_segments)
    q_QD, do_QD = q_ref[i], do_ref[i]
    p_KQ = jnp.where(mask_KQ, jnp.exp(_nt_dot(k_KD, q_QD) * scale - lse_ref[i]), 0.0)
    dv_KD = dv_KD + jnp.dot(p_KQ.astype(do_QD.dtype), do_QD, preferred_element_type=jnp.float32)
    ds_KQ = p_KQ * (_nt_dot(v_KD, do_QD) - delta_ref[i])
    dk_KD = dk_KD + jnp.dot(ds_KQ.astype(q_QD.dtype), q_QD, preferred_element_type=jnp.float32)
    return dk_KD, dv_KD

  zeros = jnp.zeros(k_KD.shape, jnp.float32)
  dk_KD, dv_KD = jax.lax.fori_loop(0, q_count_ref[b, kj], visit, (zeros, zeros))
  dk_ref[...] = (dk_KD * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KD.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. The metadata (visit lists) are the first two operands: ordinary inputs
# read whole for Triton and the interpreter, scalar-prefetched into SMEM for Mosaic TPU.


_PLATFORMS = ("triton", "mosaic")


def _call(kernel, grid, metadata, inputs, in_specs, out_shape, out_specs, *, name: str,
          platform: str, interpret: bool):
  """pallas_call of `kernel(meta0, meta1, *inputs, *outputs)` for `platform` (triton | mosaic).
  Triton: 4 warps up to Dh = 64, else 8 (the heuristic of jax's ops/gpu/attention.py; untuned)."""
  if platform == "mosaic":
    def shift(spec):  # index maps also receive the scalar-prefetch refs
      return pl.BlockSpec(spec.block_shape, lambda *a, f=spec.index_map: f(*a[:len(grid)]))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(metadata), grid=grid, in_specs=[shift(s) for s in in_specs],
        out_specs=[shift(s) for s in out_specs])
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
                          name=name, compiler_params=None if interpret else pltpu.CompilerParams(
                              dimension_semantics=("parallel",) * len(grid)))(*metadata, *inputs)
  whole = [pl.BlockSpec(m.shape, lambda *_, nd=m.ndim: (0,) * nd) for m in metadata]
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=[*whole, *in_specs],
                        out_specs=out_specs, interpret=interpret, name=name,
                        compiler_params=None if interpret else pltriton.CompilerParams(
                            num_warps=4 if inputs[0].shape[-1] <= 64 else 8,
                            num_stages=2))(*metadata, *inputs)


def _on_platform(fn, interpret: bool, platform: str | None):
  """fn(platform) now when interpreting or asked for; else per lowering platform."""
  if interpret or platform is not None:
    return fn(platform or "triton")
  return jax.lax.platform_dependent(cuda=lambda: fn("triton"), rocm=lambda: fn("triton"),
                                    tpu=lambda: fn("mosaic"))


class _Layout(NamedTuple):
  """Operands in kernel layout: heads before tokens, kv side stacked as [nk, bk, .]."""

  q: Array  # [B, H, T, Dh]
  k: Array  # [B, K, nk, bk, Dh]
  v: Array  # [B, K, nk, bk, Dh]
  q_idx: Array  # [B, T, 1]
  q_seg: Array  # [B, T, 1]
  kv_idx: Array  # [B, nk, 1, bk]
  kv_seg: Array  # [B, nk, 1, bk]


def _pad_axis(x: Array, axis: int, multiple: int) -> Array:
  pad = -x.shape[axis] % multiple
  return x if pad == 0 else jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])


def _layout(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, bq: int,
            bk: int) -> _Layout:
  b = q_BTHD.shape[0]
  q_BTHD = _pad_axis(q_BTHD, 1, bq)
  k_BSKD, v_BSKD = _pad_axis(k_BSKD, 1, bk), _pad_axis(v_BSKD, 1, bk)
  s, kv_heads, dh = k_BSKD.shape[1:]
  q_idx_BT, q_seg_BT = _pad_axis(q_idx_BT, 1, bq), _pad_axis(q_seg_BT, 1, bq)  # padding: seg 0
  kv_idx_BS, kv_seg_BS = _pad_axis(kv_idx_BS, 1, bk), _pad_axis(kv_seg_BS, 1, bk)

  def stack(x_BSKD):
    return jnp.swapaxes(x_BSKD, 1, 2).reshape(b, kv_heads, s // bk, bk, dh)

  return _Layout(jnp.swapaxes(q_BTHD, 1, 2), stack(k_BSKD), stack(v_BSKD), q_idx_BT[..., None],
                 q_seg_BT[..., None], kv_idx_BS.reshape(b, s // bk, 1, bk),
                 kv_seg_BS.reshape(b, s // bk, 1, bk))


def _forward(x: _Layout, visits: _Visits, *, causal, cross_segments, bq, interpret, platform):
  b, h, tp, dh = x.q.shape
  kv_heads, nk, bk = x.k.shape[1:4]
  group = h // kv_heads
  sq = pl.Squeezed()
  kernel = functools.partial(_fwd_kernel, scale=dh**-0.5, causal=causal,
                             cross_segments=cross_segments)
  q_spec = pl.BlockSpec((sq, sq, bq, dh), lambda bb, hh, i: (bb, hh, i, 0))
  kv_spec = pl.BlockSpec((sq, sq, nk, bk, dh), lambda bb, hh, i: (bb, hh // group, 0, 0, 0))
  qm_spec = pl.BlockSpec((sq, bq, 1), lambda bb, hh, i: (bb, i, 0))
  km_spec = pl.BlockSpec((sq, nk, 1, bk), lambda bb, hh, i: (bb, 0, 0, 0))
  lse_spec = pl.BlockSpec((sq, sq, bq, 1), lambda bb, hh, i: (bb, hh, i, 0))
  return _on_platform(lambda p: _call(
      kernel, (b, h, tp // bq), (visits.kv_list, visits.kv_count),
      (x.q, x.k, x.v, x.q_idx, x.q_seg, x.kv_idx, x.kv_seg),
      [q_spec, kv_spec, kv_spec, qm_spec, qm_spec, km_spec, km_spec],
      [jax.ShapeDtypeStruct(x.q.shape, x.q.dtype),
       jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32)],
      [q_spec, lse_spec], name="routed_attention_fwd", platform=p, interpret=interpret),
      interpret, platform)


def _backward(x: _Layout, visits: _Visits, out_BHTD, lse_BHT1, do_BHTD, *, causal,
              cross_segments, bq, interpret, platform):
  b, h, tp, dh = x.q.shape
  kv_heads, nk, bk = x.k.shape[1:4]
  nq, group = tp // bq, h // kv_heads
  sq = pl.Squeezed()
  statics = dict(scale=dh**-0.5, causal=causal, cross_segments=cross_segments)
  do_BHTD = do_BHTD.astype(x.q.dtype)
  delta_BHT1 = jnp.sum(do_BHTD.astype(jnp.float32) * out_BHTD.astype(jnp.float32), axis=-1,
                       keepdims=True)

  # dq: q-side blocks by the grid, kv side whole (as the forward).
  q_spec = pl.BlockSpec((sq, sq, bq, dh), lambda bb, hh, i: (bb, hh, i, 0))
  kv_spec = pl.BlockSpec((sq, sq, nk, bk, dh), lambda bb, hh, i: (bb, hh // group, 0, 0, 0))
  qm_spec = pl.BlockSpec((sq, bq, 1), lambda bb, hh, i: (bb, i, 0))
  km_spec = pl.BlockSpec((sq, nk, 1, bk), lambda bb, hh, i: (bb, 0, 0, 0))
  row_spec = pl.BlockSpec((sq, sq, bq, 1), lambda bb, hh, i: (bb, hh, i, 0))
  dq_BHTD = _on_platform(lambda p: _call(
      functools.partial(_dq_kernel, **statics), (b, h, nq), (visits.kv_list, visits.kv_count),
      (x.q, x.k, x.v, x.q_idx, x.q_seg, x.kv_idx, x.kv_seg,
       do_BHTD, lse_BHT1, delta_BHT1),
      [q_spec, kv_spec, kv_spec, qm_spec, qm_spec, km_spec, km_spec, q_spec, row_spec, row_spec],
      [jax.ShapeDtypeStruct(x.q.shape, x.q.dtype)], [q_spec],
      name="routed_attention_dq", platform=p, interpret=interpret), interpret, platform)[0]

  # dk, dv per query head: kv-side blocks by the grid, q side stacked [nq, bq, .] and whole.
  def q_stack(x_BHTY):
    return x_BHTY.reshape(b, h, nq, bq, x_BHTY.shape[-1])

  def row_stack(x_BHT1):  # a row per q block: [B, H, nq, 1, bq]
    return x_BHT1.reshape(b, h, nq, 1, bq)

  qs_spec = pl.BlockSpec((sq, sq, nq, bq, dh), lambda bb, hh, j: (bb, hh, 0, 0, 0))
  rows_spec = pl.BlockSpec((sq, sq, nq, 1, bq), lambda bb, hh, j: (bb, hh, 0, 0, 0))
  k_spec = pl.BlockSpec((sq, sq, sq, bk, dh), lambda bb, hh, j: (bb, hh // group, j, 0, 0))
  qms_spec = pl.BlockSpec((sq, nq, 1, bq), lambda bb, hh, j: (bb, 0, 0, 0))
  kms_spec = pl.BlockSpec((sq, sq, bk, 1), lambda bb, hh, j: (bb, j, 0, 0))
  dkv_spec = pl.BlockSpec((sq, sq, sq, bk, dh), lambda bb, hh, j: (bb, hh, j, 0, 0))
  dkv_shape = jax.ShapeDtypeStruct((b, h, nk, bk, dh), jnp.float32)
  dk_BHNCD, dv_BHNCD = _on_platform(lambda p: _call(
      functools.partial(_dkv_kernel, **statics), (b, h, nk), (visits.q_list, visits.q_count),
      (q_stack(x.q), x.k, x.v, x.q_idx.reshape(b, nq, 1, bq),
       x.q_seg.reshape(b, nq, 1, bq), x.kv_idx.reshape(b, nk, bk, 1),
       x.kv_seg.reshape(b, nk, bk, 1), q_stack(do_BHTD), row_stack(lse_BHT1),
       row_stack(delta_BHT1)),
      [qs_spec, k_spec, k_spec, qms_spec, qms_spec, kms_spec, kms_spec, qs_spec, rows_spec,
       rows_spec],
      [dkv_shape, dkv_shape], [dkv_spec, dkv_spec], name="routed_attention_dkv", platform=p,
      interpret=interpret), interpret, platform)

  def per_kv_head(d_BHNCD):  # sum over the G query heads of each kv head
    d_BKGSD = d_BHNCD.reshape(b, kv_heads, group, nk * bk, dh)
    return d_BKGSD.sum(2).astype(x.k.dtype)

  return dq_BHTD, per_kv_head(dk_BHNCD), per_kv_head(dv_BHNCD)


# ----------------------------------------------------------------------------------------------
# custom_vjp and the public function.


def _pieces(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal,
            cross_segments, bq, bk):
  x = _layout(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, bq, bk)
  visits = _visits(x.q_idx[..., 0], x.q_seg[..., 0], x.kv_idx.reshape(
      x.kv_idx.shape[0], -1), x.kv_seg.reshape(x.kv_seg.shape[0], -1),
      causal=causal, cross_segments=cross_segments, block_q=bq, block_k=bk)
  return x, visits


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _routed_attention(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal,
                      cross_segments, bq, bk, interpret, platform):
  return _routed_attention_fwd(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS,
                               causal, cross_segments, bq, bk, interpret, platform)[0]


def _routed_attention_fwd(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS,
                          causal, cross_segments, bq, bk, interpret, platform):
  x, visits = _pieces(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal,
                      cross_segments, bq, bk)
  out_BHTD, lse_BHT1 = _forward(x, visits, causal=causal, cross_segments=cross_segments, bq=bq,
                                interpret=interpret, platform=platform)
  t = q_BTHD.shape[1]
  out_BTHD = jnp.swapaxes(out_BHTD, 1, 2)[:, :t]
  residuals = (q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, out_BHTD,
               lse_BHT1)
  return out_BTHD, residuals


def _routed_attention_bwd(causal, cross_segments, bq, bk, interpret, platform, residuals,
                          do_BTHD):
  q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, out_BHTD, lse_BHT1 = residuals
  x, visits = _pieces(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, causal,
                      cross_segments, bq, bk)
  do_BHTD = _pad_axis(jnp.swapaxes(do_BTHD, 1, 2), 2, bq)
  dq_BHTD, dk_BKSD, dv_BKSD = _backward(x, visits, out_BHTD, lse_BHT1, do_BHTD, causal=causal,
                                        cross_segments=cross_segments, bq=bq,
                                        interpret=interpret, platform=platform)
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  return (jnp.swapaxes(dq_BHTD, 1, 2)[:, :t], jnp.swapaxes(dk_BKSD, 1, 2)[:, :s],
          jnp.swapaxes(dv_BKSD, 1, 2)[:, :s], None, None, None, None)


_routed_attention.defvjp(_routed_attention_fwd, _routed_attention_bwd)


def _block(requested: int, n: int) -> int:
  """The requested block, or for a shorter axis the power of two >= n, at least 16 (Triton's
  smallest dot; a multiple of the bfloat16 sublane tiling on TPU)."""
  return requested if n >= requested else max(16, 1 << (n - 1).bit_length())


def routed_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array,
                     q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *, causal: bool,
                     cross_segments: bool, block_q: int = 128, block_k: int = 128,
                     interpret: bool, platform: str | None = None) -> Array:
  """Flash attention of the queries over the keys they may read (module docstring); out [B, T,
  H, Dh] in q's dtype, differentiable in q, k and v. GQA: query head h reads kv head h // (H/K).

  T and S need not be multiples of the blocks (padded with segment 0). `interpret` runs the
  Pallas interpreter (CPU). `platform` (triton | mosaic) forces a variant; None picks it per
  lowering platform (cuda/rocm: Triton, tpu: Mosaic) and the Triton one when interpreting."""
  b, t, h, dh = q_BTHD.shape
  if k_BSKD.ndim != 4 or k_BSKD.shape != v_BSKD.shape or k_BSKD.shape[0] != b or (
      k_BSKD.shape[3] != dh) or h % k_BSKD.shape[2]:
    raise ValueError(f"routed_attention: expected q [B, T, H, Dh] and k, v [B, S, K, Dh] with "
                     f"H % K == 0, got {q_BTHD.shape}, {k_BSKD.shape}, {v_BSKD.shape}")
  s = k_BSKD.shape[1]
  if q_idx_BT.shape != (b, t) or q_seg_BT.shape != (b, t) or kv_idx_BS.shape != (b, s) or (
      kv_seg_BS.shape != (b, s)):
    raise ValueError(f"routed_attention: q_idx, q_seg must be [B, T] = {(b, t)} and kv_idx, "
                     f"kv_seg [B, S] = {(b, s)}")
  if platform not in (None, *_PLATFORMS):
    raise ValueError(f"routed_attention: platform {platform!r} not in {(None, *_PLATFORMS)}")
  dtype = q_BTHD.dtype
  return _routed_attention(q_BTHD, k_BSKD.astype(dtype), v_BSKD.astype(dtype),
                           *(a.astype(jnp.int32) for a in (q_idx_BT, q_seg_BT, kv_idx_BS,
                                                            kv_seg_BS)),
                           bool(causal), bool(cross_segments), _block(block_q, t),
                           _block(block_k, s), bool(interpret), platform)
