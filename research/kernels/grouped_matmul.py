"""Grouped matmul, out[m] = lhs[m] @ rhs[group(m)], for rows sorted by group (docs/kernels.md).

Semantics of jax.lax.ragged_dot: with o = (0, cumsum(group_sizes)), rows [o_g, o_{g+1}) of lhs use
rhs[g]; rows at or past sum(group_sizes) belong to no group and give 0. Inputs are zero-padded to
multiples of the tiles (tm, tk, tn) and the result sliced back, so any M, K, N work.

Kernels (generic Pallas API: interpret mode on CPU, written for the Triton lowering on GPU):
- `_gmm_kernel`, grid (M / tm, N / tn): one output tile loops over the groups that meet its rows
  (precomputed first/last group per row tile), zeroes the lhs rows outside the group and
  accumulates lhs_tile @ rhs[g] over K in float32. A group boundary inside a tile is the row mask.
- `_tgmm_kernel`, grid (G, K / tk, N / tn): the weight gradient d_rhs[g] = lhs_g^T @ dout_g loops
  over the row tiles that meet group g, masking rows outside it. An empty group gives 0.

`grouped_matmul` is a custom_vjp: d_lhs = gmm(dout, rhs^T) and d_rhs = tgmm(lhs, dout).
`grouped_matmul_reference` is the pure-jnp loop over groups the kernels are tested against.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

DEFAULT_TILING = (128, 128, 128)  # (tm, tk, tn); powers of 2 >= 16 for the Triton lowering


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


def _compiler_params(interpret: bool) -> pltriton.CompilerParams | None:
  """Triton's on GPU (else Pallas would pick Mosaic GPU); Mosaic's defaults on TPU; none when
  interpreting."""
  if interpret or jax.default_backend() == "tpu":
    return None
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_to(x: Array, shape: tuple[int, ...]) -> Array:
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


def _group_offsets(group_sizes_G: Array, m: int) -> Array:
  """o [G + 1]: group g owns rows [o_g, o_{g+1}), clipped to the M rows."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G])


def _gmm_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, tm: int, tk: int,
                num_k: int):
  """One (tm, tn) output tile: sum over the groups g meeting its rows of mask_g lhs @ rhs[g]."""
  i = pl.program_id(0)
  rows_M1 = (i * tm + jnp.arange(tm, dtype=jnp.int32))[:, None]

  def group(g, acc_MN):
    in_group_M1 = (rows_M1 >= offsets_ref[g]) & (rows_M1 < offsets_ref[g + 1])

    def k_step(kk, acc_MN):
      x_MK = jnp.where(in_group_M1, lhs_ref[:, pl.ds(kk * tk, tk)], 0)
      w_KN = rhs_ref[g, pl.ds(kk * tk, tk), :]
      return acc_MN + jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, num_k, k_step, acc_MN)

  acc_MN = jnp.zeros(out_ref.shape, jnp.float32)
  acc_MN = jax.lax.fori_loop(first_ref[i], last_ref[i], group, acc_MN)
  out_ref[...] = acc_MN.astype(out_ref.dtype)


def _gmm(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array, tiling: tuple[int, int, int],
         interpret: bool) -> Array:
  """The forward kernel: pads to the tiles, runs, slices back; lhs and rhs share a dtype."""
  tm, tk, tn = tiling
  (m, k), (num_groups, _, n) = lhs_MK.shape, rhs_GKN.shape
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs_MK = _pad_to(lhs_MK, (mp, kp))
  rhs_GKN = _pad_to(rhs_GKN, (num_groups, kp, np_))
  offsets_G1 = _group_offsets(group_sizes_G, m)
  tile_start_T = jnp.arange(0, mp, tm, dtype=jnp.int32)
  # Groups [first, last) meet row tile i: those ending after its first row and starting before
  # its end (empty groups between them add 0).
  first_T = jnp.searchsorted(offsets_G1[1:], tile_start_T, side="right").astype(jnp.int32)
  last_T = jnp.searchsorted(offsets_G1[:-1], tile_start_T + tm, side="left").astype(jnp.int32)
  tiles = mp // tm
  metadata = [pl.BlockSpec((size,), lambda i, j: (0,)) for size in (num_groups + 1, tiles, tiles)]
  out_MN = pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, tk=tk, num_k=kp // tk),
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs_MK.dtype),
      grid=(tiles, np_ // tn),
      in_specs=[*metadata, pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((num_groups, kp, tn), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      interpret=interpret,
      name="grouped_matmul",
      compiler_params=_compiler_params(interpret),
  )(offsets_G1, first_T, last_T, lhs_MK, rhs_GKN)
  return out_MN[:m, :n]


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm: int):
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
         tiling: tuple[int, int, int] = DEFAULT_TILING, *, interpret: bool = False) -> Array:
  """Transposed grouped matmul: d_rhs [G, K, N], d_rhs[g] = lhs_g^T @ dout_g over the rows of
  group g (0 for an empty group). The dtype of lhs out."""
  tm, tk, tn = tiling
  (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs_MK = _pad_to(lhs_MK, (mp, kp))
  dout_MN = _pad_to(dout_MN.astype(lhs_MK.dtype), (mp, np_))
  out_GKN = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), lhs_MK.dtype),
      grid=(num_groups, kp // tk, np_ // tn),
      in_specs=[pl.BlockSpec((num_groups + 1,), lambda g, a, b: (0,)),
                pl.BlockSpec((mp, tk), lambda g, a, b: (0, a)),
                pl.BlockSpec((mp, tn), lambda g, a, b: (0, b))],
      out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda g, a, b: (g, a, b)),
      interpret=interpret,
      name="grouped_matmul_tgmm",
      compiler_params=_compiler_params(interpret),
  )(_group_offsets(group_sizes_G, m), lhs_MK, dout_MN)
  return out_GKN[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array,
                    tiling: tuple[int, int, int], interpret: bool) -> Array:
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret)


def _grouped_matmul_fwd(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret):
  out_MN = _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling, interpret)
  return out_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def _grouped_matmul_bwd(tiling, interpret, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  tm, tk, tn = tiling
  # d_lhs: the same kernel with rhs^T per group (its K is our N, its N our K).
  d_lhs_MK = _gmm(dout_MN.astype(lhs_MK.dtype), jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G,
                  (tm, tn, tk), interpret)
  d_rhs_GKN = tgmm(lhs_MK, dout_MN, group_sizes_G, tiling, interpret=interpret)
  return d_lhs_MK, d_rhs_GKN, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array,
                   tiling: tuple[int, int, int] = DEFAULT_TILING, *,
                   interpret: bool = False) -> Array:
  """out [M, N], out[m] = lhs[m] @ rhs[g] for the group g owning row m (0 past the groups), as
  jax.lax.ragged_dot; differentiable in lhs and rhs. Both are cast to their common dtype, the
  products accumulate in float32. `interpret` runs the Pallas interpreter (CPU)."""
  if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
    raise ValueError(f"grouped_matmul: expected lhs [M, K] and rhs [G, K, N], got "
                     f"{lhs_MK.shape} and {rhs_GKN.shape}")
  if group_sizes_G.shape != rhs_GKN.shape[:1]:
    raise ValueError(f"grouped_matmul: group_sizes {group_sizes_G.shape} must be [G] with "
                     f"G = rhs.shape[0] = {rhs_GKN.shape[0]}")
  if len(tiling) != 3 or any(int(t) < 1 for t in tiling):
    raise ValueError(f"grouped_matmul: tiling {tiling} must be three positive (tm, tk, tn)")
  dtype = jnp.result_type(lhs_MK, rhs_GKN)
  return _grouped_matmul(lhs_MK.astype(dtype), rhs_GKN.astype(dtype),
                         group_sizes_G.astype(jnp.int32), tuple(int(t) for t in tiling),
                         interpret)
