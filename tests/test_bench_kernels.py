"""bench/kernels.py's grouped matmul section: the chosen variants run and are timed (tiny shape)."""

import jax.numpy as jnp
import pytest

from bench import kernels


def test_gmm_variants_are_the_chosen_ones_each_timed():
  shape, records = kernels.bench_gmm(4, 40, 16, 24, jnp.float32, steps=1, warmup=0, seed=0,
                                     peak_flops=1e12, names=["tiled", "ragged_dot"])
  assert sum(shape["group_sizes"]) == 40
  assert {(r["variant"], r["pass"]) for r in records} == {
      (v, p) for v in ("tiled", "ragged_dot") for p in ("fwd", "fwd_bwd")}
  assert all("error" not in r and r["seconds"] > 0 for r in records)
  with pytest.raises(ValueError, match="--gmm_variants: unknown"):
    kernels.bench_gmm(4, 40, 16, 24, jnp.float32, steps=1, warmup=0, seed=0, peak_flops=1e12,
                      names=["triton"])
