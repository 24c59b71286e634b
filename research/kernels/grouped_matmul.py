"""Grouped matmul, out[m] = lhs[m] @ rhs[group(m)], for rows sorted by group (docs/kernels.md).

Semantics of jax.lax.ragged_dot: with o = (0, cumsum(group_sizes)), rows [o_g, o_{g+1}) of lhs use
rhs[g]; rows at or past sum(group_sizes) belong to no group and give 0. Inputs are zero-padded to
multiples of the tiles (tm, tk, tn) and the result sliced back, so any M, K, N work.

Group metadata (computed before the call, as megablox's make_group_metadata): a list of visits,
one per (row tile, non-empty group meeting it), in row order, so a row tile straddling groups is
visited once per group, plus one visit per row tile past every group (it writes 0), padded to the
static bound M/tm + G - 1 with no-op visits. Each visit owns the rows of its group inside its
tile (the last group's visit also the rows past every group): a straddling tile is handled by
masking, every output row is written by exactly one visit.

Two variants of each kernel, picked per lowering platform (`jax.lax.platform_dependent`):
- "mosaic" (TPU): megablox's grid (N/tn, visits, K/tk) driven by the scalar-prefetched metadata
  (pltpu.PrefetchScalarGridSpec, in SMEM): the index maps pick the (tm, tk) lhs tile and the
  (tk, tn) tile of the visit's group's weight; a float32 VMEM accumulator sums over the k axis;
  the last k step writes the visit's rows of the resident output tile.
- "triton" (GPU; Triton has no scalar prefetch, and its programs run concurrently, so no
  accumulation across grid steps): grid (visits, N/tn); the program reads its visit from the
  metadata (an ordinary input), loops over K loading only (tm, tk) lhs and (tk, tn) rhs tiles
  through pointer refs, and stores its rows with a masked store.
The weight gradient tgmm: d_rhs[g] = lhs_g^T @ dout_g. "mosaic": grid (N/tn, K/tk, visits) over
visits ordered by group (an empty group gets one visit that writes 0), the (tk, tn) accumulator
zeroed at a group's first visit and written at its last. "triton": grid (G, K/tk, N/tn), the
program loops over the row tiles meeting its group, masking rows outside it.

`grouped_matmul` is a custom_vjp: d_lhs = gmm(dout, rhs^T) and d_rhs = tgmm(lhs, dout).
`grouped_matmul_reference` is the pure-jnp loop over groups the kernels are tested against.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

DEFAULT_TILING = (128, 128, 128)  # (tm, tk, tn); powers of 2 >= 16 for the Triton lowering
PLATFORMS = ("triton", "mosaic")


def grouped_matmul_reference(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array) -> Array:
  """Pure-jnp reference: for each group g, the rows [o_g, o_{g+1}) of lhs @ rhs[g]; float32
  accumulation, the inputs' dtype out."""
  dtype = jnp.result_type(lhs_MK, rhs_GKN)
  ends_G = jnp.cumsum(group_sizes_G)
  starts_G = ends_G - group_sizes_G
  rows_M = jnp.arange(lhs_MK.shape[0])
  out_MN = jnp.zeros((lhs_MK.shape[0], rhs_GKN.shape[2]), jnp.float32)
  for g in range(rhs_GKN.shape[0]):
    in_group_M = (rows_M >= starts_G[g]) & (rows_M < ends_G[g])
    y_MN = jnp.dot(lhs_MK.astype(dtype), rhs_GKN[g].astype(dtype),
                   preferred_element_type=jnp.float32)
    out_MN = out_MN + jnp.where(in_group_M[:, None], y_MN, 0.0)
  return out_MN.astype(dtype)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_to(x: Array, shape: tuple[int, ...]) -> Array:
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


def group_offsets(group_sizes_G: Array, m: int) -> Array:
  """o [G + 1]: group g owns rows [o_g, o_{g+1}), clipped to the M rows."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G])


class Visits(NamedTuple):
  """Per-visit metadata [V] (int32): the weight's group, the row tile, the rows [start, own_end)
  the visit writes, real_end (rows at or past it are past the group: 0), compute (a group with
  rows: run the matmul), live (not padding), and for tgmm first / last (visit of its group)."""

  group: Array
  tile: Array
  start: Array
  own_end: Array
  real_end: Array
  compute: Array
  live: Array
  first: Array
  last: Array

  def stacked(self) -> Array:
    """[9, V]: one int32 array to prefetch."""
    return jnp.stack(self).astype(jnp.int32)


def _pad_visits(fields: dict, count: Array, size: int) -> Visits:
  """Slots at or past `count` repeat the last real visit with live = 0 (no-op, same blocks)."""
  v_V = jnp.arange(size, dtype=jnp.int32)
  src_V = jnp.minimum(v_V, count - 1)
  out = {name: jnp.take(value, src_V).astype(jnp.int32) for name, value in fields.items()}
  out["live"] = (v_V < count).astype(jnp.int32)
  return Visits(**out)


def gmm_visits(offsets_G1: Array, tm: int, m_padded: int) -> Visits:
  """Forward visits in row order: one per (row tile, non-empty group meeting it), then one per
  row tile past every group; V = M/tm + G - 1 slots (the bound when every group boundary falls
  inside a tile)."""
  num_groups, tiles = offsets_G1.shape[0] - 1, m_padded // tm
  size = tiles + num_groups - 1
  starts_G, ends_G = offsets_G1[:-1], offsets_G1[1:]
  nonempty_G = ends_G > starts_G
  first_tile_G = starts_G // tm
  tiles_G = jnp.where(nonempty_G, -(-ends_G // tm) - first_tile_G, 0)
  cum_G = jnp.cumsum(tiles_G)
  n_group = cum_G[-1]
  covered = -(-offsets_G1[-1] // tm)  # tiles [0, covered) meet a group
  count = n_group + tiles - covered
  v_V = jnp.arange(size, dtype=jnp.int32)
  g_V = jnp.minimum(jnp.searchsorted(cum_G, v_V, side="right"), num_groups - 1).astype(jnp.int32)
  in_group_V = v_V < n_group
  last_nonempty = jnp.max(jnp.where(nonempty_G, jnp.arange(num_groups), -1))
  tile_V = jnp.where(in_group_V, first_tile_G[g_V] + v_V - (cum_G[g_V] - tiles_G[g_V]),
                     covered + v_V - n_group)
  # Tiles past every group keep the weight tile of the last group visited (no new weight load).
  g_V = jnp.where(in_group_V, g_V, jnp.maximum(last_nonempty, 0))
  start_V = jnp.where(in_group_V, starts_G[g_V], tile_V * tm)
  real_end_V = jnp.where(in_group_V, ends_G[g_V], start_V)
  own_end_V = jnp.where(in_group_V & (g_V != last_nonempty), real_end_V, m_padded)
  fields = dict(group=g_V, tile=tile_V, start=start_V, own_end=own_end_V, real_end=real_end_V,
                compute=in_group_V, first=jnp.zeros_like(v_V), last=jnp.zeros_like(v_V))
  return _pad_visits(fields, count, size)


def tgmm_visits(offsets_G1: Array, tm: int, m_padded: int) -> Visits:
  """tgmm visits in group order: one per row tile meeting each non-empty group, one (computing
  nothing, writing 0) per empty group; V = M/tm + G - 1 slots."""
  num_groups, tiles = offsets_G1.shape[0] - 1, m_padded // tm
  size = tiles + num_groups - 1
  starts_G, ends_G = offsets_G1[:-1], offsets_G1[1:]
  nonempty_G = ends_G > starts_G
  first_tile_G = starts_G // tm
  visits_G = jnp.where(nonempty_G, -(-ends_G // tm) - first_tile_G, 1)
  cum_G = jnp.cumsum(visits_G)
  v_V = jnp.arange(size, dtype=jnp.int32)
  g_V = jnp.minimum(jnp.searchsorted(cum_G, v_V, side="right"), num_groups - 1).astype(jnp.int32)
  r_V = v_V - (cum_G[g_V] - visits_G[g_V])  # the visit's rank within its group
  fields = dict(group=g_V, tile=jnp.minimum(first_tile_G[g_V] + r_V, tiles - 1),
                start=starts_G[g_V],
                own_end=ends_G[g_V], real_end=ends_G[g_V], compute=nonempty_G[g_V],
                first=r_V == 0, last=r_V == visits_G[g_V] - 1)
  return _pad_visits(fields, cum_G[-1], size)


_GROUP, _TILE, _START, _OWN_END, _REAL_END, _COMPUTE, _LIVE, _FIRST, _LAST = range(9)


def _on_platform(fn, interpret: bool, platform: str | None):
  """fn(platform) now when interpreting or asked for (interpreting: "triton" by default); else
  per lowering platform: Triton on cuda/rocm, Mosaic on tpu."""
  if interpret or platform is not None:
    return fn(platform or "triton")
  return jax.lax.platform_dependent(cuda=lambda: fn("triton"), rocm=lambda: fn("triton"),
                                    tpu=lambda: fn("mosaic"))


def _triton_params(interpret: bool) -> pltriton.CompilerParams | None:
  """Triton's on GPU (else Pallas would pick Mosaic GPU); none when interpreting."""
  return None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2)


def _gmm_kernel_mosaic(meta_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int):
  """One (visit, k) step: acc += lhs_tile @ rhs[g]_tile; the last k step writes the visit's rows
  [start, own_end) of the resident (tm, tn) output tile (rows past the group: 0)."""
  v, kk = pl.program_id(1), pl.program_id(2)
  compute = meta_ref[_COMPUTE, v] == 1

  @pl.when((kk == 0) & compute)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(compute)
  def _():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

  @pl.when((kk == pl.num_programs(2) - 1) & (meta_ref[_LIVE, v] == 1))
  def _():
    rows_MN = meta_ref[_TILE, v] * tm + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    owned_MN = (rows_MN >= meta_ref[_START, v]) & (rows_MN < meta_ref[_OWN_END, v])
    value_MN = jnp.where(compute & (rows_MN < meta_ref[_REAL_END, v]), acc_ref[...], 0.0)
    out_ref[...] = jnp.where(owned_MN, value_MN.astype(out_ref.dtype), out_ref[...])


def _gmm_kernel_triton(meta_ref, lhs_ref, rhs_ref, out_ref, *, tm: int, tk: int, tn: int,
                       num_k: int):
  """One (visit, n tile): sum over k of lhs[tile, k] @ rhs[g, k, n] (only (tm, tk) and (tk, tn)
  tiles loaded), stored to the visit's rows with a masked store."""
  v, j = pl.program_id(0), pl.program_id(1)
  tile, group = meta_ref[_TILE, v], meta_ref[_GROUP, v]
  rows = pl.ds(tile * tm, tm)
  cols = pl.ds(j * tn, tn)

  def k_step(kk, acc_MN):
    x_MK = lhs_ref[rows, pl.ds(kk * tk, tk)]
    w_KN = rhs_ref[group, pl.ds(kk * tk, tk), cols]
    return acc_MN + jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32)

  steps = jnp.where(meta_ref[_COMPUTE, v] == 1, num_k, 0)
  acc_MN = jax.lax.fori_loop(0, steps, k_step, jnp.zeros((tm, tn), jnp.float32))
  rows_M1 = (tile * tm + jnp.arange(tm, dtype=jnp.int32))[:, None]
  owned_M1 = ((rows_M1 >= meta_ref[_START, v]) & (rows_M1 < meta_ref[_OWN_END, v])
              & (meta_ref[_LIVE, v] == 1))
  value_MN = jnp.where(rows_M1 < meta_ref[_REAL_END, v], acc_MN, 0.0).astype(out_ref.dtype)
  pltriton.store(out_ref.at[rows, cols], value_MN, mask=jnp.broadcast_to(owned_M1, (tm, tn)))


def _gmm(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array, tiling: tuple[int, int, int],
         interpret: bool, platform: str | None = None) -> Array:
  """The forward kernel: pads to the tiles, runs, slices back; lhs and rhs share a dtype."""
  tm, tk, tn = tiling
  (m, k), (num_groups, _, n) = lhs_MK.shape, rhs_GKN.shape
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs_MK = _pad_to(lhs_MK, (mp, kp))
  rhs_GKN = _pad_to(rhs_GKN, (num_groups, kp, np_))
  meta = gmm_visits(group_offsets(group_sizes_G, m), tm, mp).stacked()
  num_visits, num_k, out_shape = meta.shape[1], kp // tk, jax.ShapeDtypeStruct((mp, np_),
                                                                               lhs_MK.dtype)

  def call(platform):
    if platform == "mosaic":
      def k_of(v, kk, meta):  # no-op visits keep the last k tile (no new loads)
        return jnp.where(meta[_COMPUTE, v] == 1, kk, num_k - 1)
      grid_spec = pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(np_ // tn, num_visits, num_k),
          in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, meta: (meta[_TILE, v],
                                                                   k_of(v, kk, meta))),
                    pl.BlockSpec((pl.Squeezed(), tk, tn), lambda j, v, kk, meta: (
                        meta[_GROUP, v], k_of(v, kk, meta), j))],
          out_specs=pl.BlockSpec((tm, tn), lambda j, v, kk, meta: (meta[_TILE, v], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
      return pl.pallas_call(
          functools.partial(_gmm_kernel_mosaic, tm=tm), out_shape=out_shape,
          grid_spec=grid_spec, interpret=interpret, name="grouped_matmul",
          compiler_params=None if interpret else pltpu.CompilerParams(
              dimension_semantics=("parallel", "arbitrary", "arbitrary")))(meta, lhs_MK, rhs_GKN)
    return pl.pallas_call(
        functools.partial(_gmm_kernel_triton, tm=tm, tk=tk, tn=tn, num_k=num_k),
        out_shape=out_shape, grid=(num_visits, np_ // tn),
        in_specs=[pl.BlockSpec(meta.shape, lambda v, j: (0, 0)),
                  pl.BlockSpec((mp, kp), lambda v, j: (0, 0)),
                  pl.BlockSpec((num_groups, kp, np_), lambda v, j: (0, 0, 0))],
        out_specs=pl.BlockSpec((mp, np_), lambda v, j: (0, 0)),
        interpret=interpret, name="grouped_matmul",
        compiler_params=_triton_params(interpret))(meta, lhs_MK, rhs_GKN)

  return _on_platform(call, interpret, platform)[:m, :n]


def _tgmm_kernel_mosaic(meta_ref, lhs_ref, dout_ref, out_ref, acc_ref, *, tm: int):
  """One visit of group g: acc += (mask_g lhs_tile)^T dout_tile; zeroed at g's first visit,
  written to d_rhs[g]'s (tk, tn) tile at its last."""
  v = pl.program_id(2)

  @pl.when(meta_ref[_FIRST, v] == 1)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((meta_ref[_COMPUTE, v] == 1) & (meta_ref[_LIVE, v] == 1))
  def _():
    rows_MK = meta_ref[_TILE, v] * tm + jax.lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
    in_group_MK = (rows_MK >= meta_ref[_START, v]) & (rows_MK < meta_ref[_REAL_END, v])
    x_MK = jnp.where(in_group_MK, lhs_ref[...], 0)
    acc_ref[...] += jax.lax.dot_general(x_MK, dout_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  @pl.when((meta_ref[_LAST, v] == 1) & (meta_ref[_LIVE, v] == 1))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_kernel_triton(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm: int):
  """One (tk, tn) tile of d_rhs[g]: sum over the row tiles meeting group g of (mask lhs)^T dout."""
  g = pl.program_id(0)
  start, end = offsets_ref[g], offsets_ref[g + 1]

  def row_tile(i, acc_KN):
    rows_M1 = (i * tm + jnp.arange(tm, dtype=jnp.int32))[:, None]
    in_group_M1 = (rows_M1 >= start) & (rows_M1 < end)
    x_MK = jnp.where(in_group_M1, lhs_ref[pl.ds(i * tm, tm), :], 0)
    dy_MN = dout_ref[pl.ds(i * tm, tm), :]
    return acc_KN + jax.lax.dot_general(x_MK, dy_MN, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  first = start // tm
  last = jnp.where(end > start, (end + tm - 1) // tm, first)
  acc_KN = jax.lax.fori_loop(first, last, row_tile, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc_KN.astype(out_ref.dtype)


def tgmm(lhs_MK: Array, dout_MN: Array, group_sizes_G: Array,
         tiling: tuple[int, int, int] = DEFAULT_TILING, *, interpret: bool = False,
         platform: str | None = None) -> Array:
  """Transposed grouped matmul: d_rhs [G, K, N], d_rhs[g] = lhs_g^T @ dout_g over the rows of
  group g (0 for an empty group). The dtype of lhs out. `platform` as in grouped_matmul."""
  tm, tk, tn = tiling
  (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs_MK = _pad_to(lhs_MK, (mp, kp))
  dout_MN = _pad_to(dout_MN.astype(lhs_MK.dtype), (mp, np_))
  offsets_G1 = group_offsets(group_sizes_G, m)
  out_shape = jax.ShapeDtypeStruct((num_groups, kp, np_), lhs_MK.dtype)

  def call(platform):
    if platform == "mosaic":
      meta = tgmm_visits(offsets_G1, tm, mp).stacked()
      grid_spec = pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(np_ // tn, kp // tk, meta.shape[1]),
          in_specs=[pl.BlockSpec((tm, tk), lambda j, a, v, meta: (meta[_TILE, v], a)),
                    pl.BlockSpec((tm, tn), lambda j, a, v, meta: (meta[_TILE, v], j))],
          out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn),
                                 lambda j, a, v, meta: (meta[_GROUP, v], a, j)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
      return pl.pallas_call(
          functools.partial(_tgmm_kernel_mosaic, tm=tm), out_shape=out_shape,
          grid_spec=grid_spec, interpret=interpret, name="grouped_matmul_tgmm",
          compiler_params=None if interpret else pltpu.CompilerParams(
              dimension_semantics=("parallel", "parallel", "arbitrary")))(meta, lhs_MK, dout_MN)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel_triton, tm=tm), out_shape=out_shape,
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[pl.BlockSpec((num_groups + 1,), lambda g, a, b: (0,)),
                  pl.BlockSpec((mp, tk), lambda g, a, b: (0, a)),
                  pl.BlockSpec((mp, tn), lambda g, a, b: (0, b))],
        out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda g, a, b: (g, a, b)),
        interpret=interpret, name="grouped_matmul_tgmm",
        compiler_params=_triton_params(interpret))(offsets_G1, lhs_MK, dout_MN)

  return _on_platform(call, interpret, platform)[:, :k, :n]

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array,
                    tiling: tuple[int, int, int], interpret: bool, platform: str | None) -> Array:
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret, platform)


def _grouped_matmul_fwd(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret, platform):
  out_MN = _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret, platform)
  return out_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def _grouped_matmul_bwd(tiling, interpret, platform, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  tm, tk, tn = tiling
  # d_lhs: the same kernel with rhs^T per group (its K is our N, its N our K).
  d_lhs_MK = _gmm(dout_MN.astype(lhs_MK.dtype), jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G,
                  (tm, tn, tk), interpret, platform)
  d_rhs_GKN = tgmm(lhs_MK, dout_MN, group_sizes_G, tiling, interpret=interpret,
                   platform=platform)
  return d_lhs_MK, d_rhs_GKN, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array,
                   tiling: tuple[int, int, int] = DEFAULT_TILING, *,
                   interpret: bool = False, platform: str | None = None) -> Array:
  """out [M, N], out[m] = lhs[m] @ rhs[g] for the group g owning row m (0 past the groups), as
  jax.lax.ragged_dot; differentiable in lhs and rhs. Both are cast to their common dtype, the
  products accumulate in float32. `interpret` runs the Pallas interpreter (CPU). `platform`
  (triton | mosaic) forces a variant; None picks it per lowering platform (cuda/rocm: Triton,
  tpu: Mosaic) and the Triton one when interpreting."""
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
    raise ValueError(f"grouped_matmul: expected lhs [M, K] and rhs [G, K, N], got "
                     f"{lhs_MK.shape} and {rhs_GKN.shape}")
  if group_sizes_G.shape != rhs_GKN.shape[:1]:
    raise ValueError(f"grouped_matmul: group_sizes {group_sizes_G.shape} must be [G] with "
                     f"G = rhs.shape[0] = {rhs_GKN.shape[0]}")
  if len(tiling) != 3 or any(int(t) < 1 for t in tiling):
    raise ValueError(f"grouped_matmul: tiling {tiling} must be three positive (tm, tk, tn)")
  if platform not in (None, *PLATFORMS):
    raise ValueError(f"grouped_matmul: platform {platform!r} not in {(None, *PLATFORMS)}")
  dtype = jnp.result_type(lhs_MK, rhs_GKN)
  return _grouped_matmul(lhs_MK.astype(dtype), rhs_GKN.astype(dtype),
                         group_sizes_G.astype(jnp.int32), tuple(int(t) for t in tiling),
                         interpret, platform)
