"""Grouped matmul in plain XLA, tiled as megablox tiles it (docs/kernels.md): the fast path where
Pallas only interprets (CPU).

Semantics of jax.lax.ragged_dot (research/kernels/grouped_matmul.py). The rows are cut into tiles
of tm; the visits are the Pallas kernel's (`gmm_visits`: one per (row tile, non-empty group
meeting it), at most M/tm + G - 1). Each visit multiplies its whole tile by its group's weight,
one batched matmul over visits,

  y[v] = lhs[tile_v] @ rhs[group_v],    out[tile_v] += y[v] masked to the rows of group_v,

so every row is computed once by its own group's weight (a straddling tile once per group,
masked) and rows past every group stay 0. The work is (M/tm + G - 1) x tm rows, against
ragged_dot's XLA:CPU lowering, which runs about G times M rows (benchmarks in docs/kernels.md).
The gradients are XLA's autodiff of the gathers, the batched matmul and the scatter-add.
"""

import jax
import jax.numpy as jnp

from research.kernels import grouped_matmul as gmm_lib

Array = jax.Array

DEFAULT_TM = 128


def tiled_grouped_matmul(lhs_MK: Array, rhs_GKN: Array, group_sizes_G: Array,
                         tm: int = DEFAULT_TM) -> Array:
  """out[m] = lhs[m] @ rhs[group(m)] (ragged_dot's semantics) through tiles of tm rows (at most
  M rounded up to 8); float32 accumulation, the inputs' dtype out."""
  m, k = lhs_MK.shape
  n = rhs_GKN.shape[2]
  dtype = jnp.result_type(lhs_MK, rhs_GKN)
  tm = min(tm, -(-m // 8) * 8)
  m_padded = -(-m // tm) * tm
  tiles_TtK = jnp.pad(lhs_MK.astype(dtype), ((0, m_padded - m), (0, 0))).reshape(-1, tm, k)
  visits = gmm_lib.gmm_visits(gmm_lib.group_offsets(group_sizes_G, m), tm, m_padded)
  y_VtN = jnp.einsum("vtk,vkn->vtn", tiles_TtK[visits.tile], rhs_GKN.astype(dtype)[visits.group],
                     preferred_element_type=jnp.float32)
  rows_Vt = visits.tile[:, None] * tm + jnp.arange(tm)[None]
  mine_Vt = ((rows_Vt >= visits.start[:, None]) & (rows_Vt < visits.real_end[:, None])
             & (visits.compute & visits.live)[:, None].astype(bool))
  out_TtN = jnp.zeros((m_padded // tm, tm, n), jnp.float32).at[visits.tile].add(
      jnp.where(mine_Vt[..., None], y_VtN, 0.0))
  return out_TtN.reshape(m_padded, n)[:m].astype(dtype)
