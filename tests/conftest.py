"""Shared fixtures: a one-device mesh with the logical sharding rules."""

import os

# Before numpy loads: pytest -n 2 on 2 cores oversubscribes a threaded OpenBLAS, and its LAPACK
# (SVD, eigh) then stalls: 14 s instead of 0.5 s for the factorisations of one SmolLM2 layer.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tests import launch_util

# Before JAX starts a backend: compile at -O0 (launch_util.TEST_XLA_FLAGS says why).
os.environ["XLA_FLAGS"] = launch_util.with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax
import pytest
from flax import nnx

from research.train import mesh as mesh_lib

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def mesh():
  """One CPU device as a (1, 1, 1) mesh, with logical axis rules active."""
  m = jax.make_mesh((1,) * len(mesh_lib.MESH_AXES), mesh_lib.MESH_AXES,
                    axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.MESH_AXES))
  with jax.set_mesh(m), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    yield m
