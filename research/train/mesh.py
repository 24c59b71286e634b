"""Device mesh, logical sharding rules and multi-process start-up.

Mesh axes: `data` (batch), `fsdp` (batch and parameter/optimizer-state shards), `tensor` (heads,
MLP width, vocabulary). Weights carry logical names (layers.py); LOGICAL_RULES maps them here.
"""

import os

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def mesh_shape(mesh_cfg: mlc.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Axis sizes with the single -1 filled in; raises ValueError naming the key on mismatch."""
  sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {unknown}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: must be a positive size or -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(f"config.mesh: the fixed axes multiply to {known}, which does not divide "
                       f"the {num_devices} available devices")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"config.mesh: data*fsdp*tensor = {known} but {num_devices} devices are "
                     "available; set one axis to -1 to fill the rest")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: mlc.ConfigDict) -> jax.sharding.Mesh:
  shape = mesh_shape(mesh_cfg, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def host_to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles each process's slice of the batch into one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def maybe_initialize_distributed(dist_cfg: mlc.ConfigDict) -> None:
  """Starts jax.distributed when asked to, or when a cluster environment is detected.

  `enabled="auto"` starts it under SLURM with more than one task, on a multi-host TPU pod (JAX's
  own detection), or when a coordinator address is given. Must run before any JAX computation.
  """
  mode = dist_cfg.enabled
  explicit = bool(dist_cfg.coordinator_address)
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
  if mode == "no" or (mode == "auto" and not (explicit or slurm or tpu_pod)):
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=dist_cfg.coordinator_address,
                  num_processes=dist_cfg.num_processes, process_id=dist_cfg.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
