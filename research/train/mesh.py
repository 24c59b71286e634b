"""Device mesh, logical sharding rules and multi-process start-up.

Mesh axes: `data` (batch), `fsdp` (batch and parameter/optimizer-state shards), `expert` (batch,
and the stacked MoE expert weights [E, ...] / a ReXMoE group's pool [r E, ...]: expert
parallelism, tokens dispatched by all-to-all in research/model/expert_parallel.py), `tensor`
(heads, MLP width, vocabulary; innermost). Weights carry logical names (layers.py);
LOGICAL_RULES maps them here.
"""

import math
import os

import jax
import ml_collections as mlc
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from research.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis is data-parallel outside the experts

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),  # MoE experts (and a ReXMoE pool's r E rows): expert parallelism
    ("norm", None),
)


def mesh_shape(mesh_cfg: mlc.ConfigDict, num_devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, expert, tensor) with the single -1 filled in (`expert` absent from an older
  config: 1); raises ConfigError naming config.mesh."""
  sizes = {axis: mesh_cfg.get(axis, 1) if axis == "expert" else mesh_cfg[axis]
           for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, int) or size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size!r}: must be a positive size or -1")
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {', '.join(unknown)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if unknown:
    if num_devices % known:
      raise ConfigError(f"config.mesh ({shown}): the fixed axes multiply to {known}, which does "
                        f"not divide the {num_devices} available devices")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"config.mesh ({shown}): {known} devices, but {num_devices} are available; "
                      "set one axis to -1 to take the rest")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: mlc.ConfigDict) -> jax.sharding.Mesh:
  """The (data, fsdp, expert, tensor) mesh over every device of every process; tensor is
  innermost."""
  shape = mesh_shape(mesh_cfg, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp x expert, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def host_to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles each process's slice of the batch into one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def under_mesh(fn, mesh: jax.sharding.Mesh):
  """fn called (and so traced, when jitted) with `mesh` set as the context mesh: the MoE layers'
  expert parallelism (research/model/expert_parallel.py) reads its `expert` axis there."""
  def called(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return called


def cluster_detected() -> bool:
  """True under a multi-task SLURM or Open MPI job, or on a multi-host GKE TPU slice."""
  env = os.environ
  tasks = max(int(env.get("SLURM_NTASKS", "1")), int(env.get("OMPI_COMM_WORLD_SIZE", "1")))
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return tasks > 1 or "," in tpu_hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(dist_cfg: mlc.ConfigDict) -> None:
  """Starts jax.distributed when asked to, or when a cluster environment is detected.

  enabled="yes" always starts it; "auto" starts it when a coordinator address is given or
  `cluster_detected()`. Without an address JAX reads the cluster from the environment (SLURM,
  Open MPI, Cloud TPU); on a multi-host GCE TPU VM pass enabled=yes. num_processes and process_id
  left at -1 are detected too. Must run before any JAX computation. CPU processes talk through
  gloo (jax's default CPU collectives).
  """
  mode = dist_cfg.enabled
  explicit = bool(dist_cfg.coordinator_address)
  if mode == "no" or (mode == "auto" and not (explicit or cluster_detected())):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if explicit:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes >= 0:
    kwargs["num_processes"] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = dist_cfg.process_id
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
