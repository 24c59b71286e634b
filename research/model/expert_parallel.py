"""Expert parallelism (docs/moe.md "Expert parallelism"): the routed experts of one MoE layer under
`jax.shard_map` over the mesh axis `expert` (research/train/mesh.py), n devices each holding
E / n consecutive experts (a ReXMoE pool: r E / n rows), the batch split over data x fsdp x
expert as everywhere else.

Per device, with its N local tokens' M = N k assignments (routed and capacity-masked before, on
the whole row, so the kept set is the one-device run's):

  sort      the assignments by global expert, dropped ones last (routing.sort_by_expert);
            expert e lives on device e // (E / n), so the order is also by destination
  dispatch  buffer [n, S, D]: the rows for device d at [d, :count_d], zeros after
            (capacity-padded); all_to_all over `expert` -> [n sources, S, D] and the per-expert
            counts [n, E / n] of each source
  compute   sort the received rows by local expert, three grouped matmuls (the ragged path's
            `gmm`), unsort
  combine   all_to_all back to the sources, read each assignment's row out of its destination's
            block, unsort, y_t = sum_i w_ti y_ti

S, the rows per (source, destination) pair, is static: M (dropless: every local assignment could
go to one device) or, with capacity C per expert and row, min(M, B_local C E / n), which no
destination can exceed. XLA:CPU has no ragged all-to-all (`jax.lax.ragged_all_to_all` is
UNIMPLEMENTED there), hence the padded buffers; values equal the one-device run's.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from research import routing
from research.kernels import dispatch

Array = jax.Array

AXIS = "expert"
BATCH_AXES = ("data", "fsdp", "expert")  # research/train/mesh.py BATCH_AXES


def axis_size() -> int:
  """Devices along the mesh axis `expert` of the mesh in context (jax.set_mesh), 1 without."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[AXIS]


def buffer_rows(tokens: int, k: int, rows: int, local_experts: int,
                capacity: int | None) -> int:
  """S, rows per (source, destination) pair: all M = tokens k local assignments (dropless), or
  with capacity C per expert and row at most rows C E_local of them reach one destination."""
  assignments = tokens * k
  return assignments if capacity is None else min(assignments, rows * capacity * local_experts)


def routed_experts(x_BTD: Array, w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array,
                   weights_BTK: Array, experts_BTK: Array, keep_BTK: Array, *, gmm: str = "xla",
                   capacity: int | None = None) -> Array:
  """y_BTD = sum_i w_i E_{e_i}(x) with the experts sharded over `expert` (module docstring):
  the entry point from moe.MoE.routed_experts when axis_size() > 1. `weights_BTK` are the gates
  (0 where dropped), `keep_BTK` the kept assignments, `capacity` C when dropping (None:
  dropless)."""
  mesh = jax.sharding.get_abstract_mesh()
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  spec_B, spec_E = P(batch), P(AXIS)

  def local(x_BTD, w_BTK, e_BTK, keep_BTK, w_gate_LDF, w_up_LDF, w_down_LFD):
    return _local_experts(x_BTD, w_BTK, e_BTK, keep_BTK, w_gate_LDF, w_up_LDF, w_down_LFD,
                          n=mesh.shape[AXIS], gmm=gmm, capacity=capacity)

  return jax.shard_map(local, in_specs=(spec_B,) * 4 + (spec_E,) * 3, out_specs=spec_B)(
      x_BTD, weights_BTK, experts_BTK, keep_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _local_experts(x_BTD: Array, w_BTK: Array, e_BTK: Array, keep_BTK: Array,
                   w_gate_LDF: Array, w_up_LDF: Array, w_down_LFD: Array, *, n: int, gmm: str,
                   capacity: int | None) -> Array:
  """One device's part: its tokens out to the experts' owners and back (L = E / n local
  experts)."""
  grouped_matmul = dispatch.grouped_matmul_fn(gmm)
  b, t, d = x_BTD.shape
  k, num_local = e_BTK.shape[-1], w_gate_LDF.shape[0]
  m = b * t * k
  s = buffer_rows(b * t, k, b, num_local, capacity)

  # sort by global expert (= by destination device), dropped assignments last
  perm_M, sizes_E = routing.sort_by_expert(e_BTK.reshape(-1), keep_BTK.reshape(-1),
                                           n * num_local)
  inv_M = routing.inverse_permutation(perm_M)
  x_MD = routing.permute_rows(jnp.repeat(x_BTD.reshape(b * t, d), k, axis=0), perm_M, inv_M)
  sizes_nL = sizes_E.reshape(n, num_local)
  count_n = jnp.sum(sizes_nL, axis=1)
  start_n = jnp.cumsum(count_n) - count_n

  # dispatch: rows for destination d at buffer[d, :count_d]
  j_S = jnp.arange(s)
  filled_nS = j_S[None, :] < count_n[:, None]
  src_nS = jnp.clip(start_n[:, None] + j_S[None, :], 0, m - 1)
  send_nSD = jnp.where(filled_nS[..., None], x_MD[src_nS], 0).astype(x_MD.dtype)
  recv_nSD = jax.lax.all_to_all(send_nSD, AXIS, 0, 0)
  recv_sizes_nL = jax.lax.all_to_all(sizes_nL, AXIS, 0, 0)

  # compute: received rows grouped by local expert (each source's block is already in order)
  ends_nL = jnp.cumsum(recv_sizes_nL, axis=1)
  local_nS = jnp.sum(j_S[None, :, None] >= ends_nL[:, None, :], axis=-1)  # num_local: empty
  local_R = local_nS.reshape(-1)
  perm_R, group_L = routing.sort_by_expert(local_R, local_R < num_local, num_local)
  inv_R = routing.inverse_permutation(perm_R)
  xr_RD = routing.permute_rows(recv_nSD.reshape(n * s, d), perm_R, inv_R)
  h_RF = (jax.nn.silu(grouped_matmul(xr_RD, w_gate_LDF, group_L))
          * grouped_matmul(xr_RD, w_up_LDF, group_L))
  yr_RD = grouped_matmul(h_RF, w_down_LFD, group_L)
  yr_nSD = routing.permute_rows(yr_RD, inv_R, perm_R).reshape(n, s, d)
  yr_nSD = jnp.where((local_nS < num_local)[..., None], yr_nSD, 0).astype(yr_RD.dtype)

  # combine: back to the sources; sorted assignment p sits at [dest_p, p - start_dest_p]
  back_nSD = jax.lax.all_to_all(yr_nSD, AXIS, 0, 0)
  p_M = jnp.arange(m)
  dest_M = jnp.minimum(jnp.sum(p_M[:, None] >= jnp.cumsum(count_n)[None, :], axis=1), n - 1)
  row_M = jnp.clip(p_M - start_n[dest_M], 0, s - 1)
  kept_M = p_M < jnp.sum(count_n)
  y_MD = jnp.where(kept_M[:, None], back_nSD[dest_M, row_M], 0).astype(back_nSD.dtype)
  y_NKD = routing.permute_rows(y_MD, inv_M, perm_M).reshape(b * t, k, d)
  y_ND = jnp.einsum("nk,nkd->nd", w_BTK.reshape(b * t, k).astype(y_NKD.dtype), y_NKD)
  return y_ND.reshape(b, t, d)
