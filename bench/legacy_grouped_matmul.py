"""The grouped matmul's previous tiling, kept for bench/kernels.py to compare against (no flags
here, so tests can import it beside other benches): one program per (row tile, n tile) looping
over the groups that meet its rows, with the whole (G, K, tn) weight block of every group."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from research.kernels import grouped_matmul as gmm_lib


def _legacy_gmm_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, tm: int,
                       tk: int, num_k: int):
  """The previous tiling: one (tm, tn) output tile loops over the groups meeting its rows, each
  over K, with the weight block (G, K, tn) of every group."""
  i = pl.program_id(0)
  rows_M1 = (i * tm + jnp.arange(tm, dtype=jnp.int32))[:, None]

  def group(g, acc_MN):
    in_group_M1 = (rows_M1 >= offsets_ref[g]) & (rows_M1 < offsets_ref[g + 1])

    def k_step(kk, acc_MN):
      x_MK = jnp.where(in_group_M1, lhs_ref[:, pl.ds(kk * tk, tk)], 0)
      return acc_MN + jnp.dot(x_MK, rhs_ref[g, pl.ds(kk * tk, tk), :],
                              preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, num_k, k_step, acc_MN)

  acc_MN = jax.lax.fori_loop(first_ref[i], last_ref[i], group, jnp.zeros(out_ref.shape,
                                                                          jnp.float32))
  out_ref[...] = acc_MN.astype(out_ref.dtype)


def legacy_grouped_matmul(lhs_MK, rhs_GKN, sizes_G, tiling=gmm_lib.DEFAULT_TILING, *,
                          interpret: bool):
  """Forward of the previous grouped matmul tiling (Triton / interpreter only), for comparison."""
  tm, tk, tn = tiling
  (m, k), (groups, _, n) = lhs_MK.shape, rhs_GKN.shape
  mp, kp, np_ = (-(-d // t) * t for d, t in ((m, tm), (k, tk), (n, tn)))
  lhs_MK = jnp.pad(lhs_MK, ((0, mp - m), (0, kp - k)))
  rhs_GKN = jnp.pad(rhs_GKN, ((0, 0), (0, kp - k), (0, np_ - n)))
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             jnp.minimum(jnp.cumsum(sizes_G.astype(jnp.int32)), m)])
  starts = jnp.arange(0, mp, tm, dtype=jnp.int32)
  first = jnp.searchsorted(offsets[1:], starts, side="right").astype(jnp.int32)
  last = jnp.searchsorted(offsets[:-1], starts + tm, side="left").astype(jnp.int32)
  tiles = mp // tm
  meta = [pl.BlockSpec((size,), lambda i, j: (0,)) for size in (groups + 1, tiles, tiles)]
  out = pl.pallas_call(
      functools.partial(_legacy_gmm_kernel, tm=tm, tk=tk, num_k=kp // tk),
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs_MK.dtype), grid=(tiles, np_ // tn),
      in_specs=[*meta, pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((groups, kp, tn), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)), interpret=interpret,
      name="grouped_matmul_legacy",
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
  )(offsets, first, last, lhs_MK, rhs_GKN)
  return out[:m, :n]
