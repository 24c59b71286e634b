"""Grouped matmul (docs/kernels.md): the Pallas kernel (both variants, Triton and Mosaic TPU) in
interpret mode and its plain-XLA tiling (tiled_grouped_matmul) == the pure-jnp reference
== jax.lax.ragged_dot, in values and in the gradients w.r.t. lhs and rhs, for group-size patterns
with empty groups, one group holding every row, sizes that are not multiples of the tile, rows past
sum(group_sizes) and an M/K/N that are not multiples of the tile; the dispatch rule; the MoE layer
with model.moe.gmm=pallas / tiled against gmm=xla.

Tolerances: float32 atol 1e-5 (K <= 48, float32 accumulation in every implementation).
bfloat16 inputs: each implementation rounds its float32 sums to bfloat16 once, at different
points for ragged_dot, so entries may differ by a few bfloat16 ulps (2^-8 relative): atol 2% of
the largest |entry| of the reference, rtol 2%.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.kernels import dispatch
from research.kernels import grouped_matmul as gmm_lib
from research.kernels import tiled_grouped_matmul as tiled_gmm
from research.model import moe
from tests.model_util import tiny_config

M, K, N = 50, 24, 40  # padded to 64 x 32 x 48 by the (16, 16, 16) test tiling
TILING = (16, 16, 16)

PATTERNS = {
    "mixed": [10, 0, 25, 7],  # empty group, boundaries inside tiles, 8 rows past the groups
    "one_group_has_all": [0, 0, 50, 0],
    "rows_past_the_groups": [3, 5, 0, 0],
    "uneven_full": [13, 13, 13, 11],
    "tile_aligned": [16, 0, 32, 2],
    "all_empty": [0, 0, 0, 0],
}


def operands(dtype, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs_MK = jax.random.normal(k1, (M, K)).astype(dtype)
  rhs_GKN = jax.random.normal(k2, (4, K, N)).astype(dtype)
  probe_MN = jax.random.normal(k3, (M, N)).astype(dtype)
  return lhs_MK, rhs_GKN, probe_MN


IMPLS = {  # "pallas": the Triton variant (the interpreter's default), "mosaic": the TPU one
    "pallas": functools.partial(gmm_lib.grouped_matmul, tiling=TILING, interpret=True),
    "mosaic": functools.partial(gmm_lib.grouped_matmul, tiling=TILING, interpret=True,
                                platform="mosaic"),
    "tiled": functools.partial(tiled_gmm.tiled_grouped_matmul, tm=16),
    "reference": gmm_lib.grouped_matmul_reference,
    "xla": jax.lax.ragged_dot,
}


@functools.cache
def value_and_grads(impl: str):
  """jitted (out, d<out, probe>/d lhs, d/d rhs); group sizes are an argument (one compile)."""
  gmm = IMPLS[impl]

  def value_and_grads(lhs_MK, rhs_GKN, sizes_G, probe_MN):
    def loss(lhs_MK, rhs_GKN):
      out_MN = gmm(lhs_MK, rhs_GKN, sizes_G)
      return jnp.sum(out_MN.astype(jnp.float32) * probe_MN.astype(jnp.float32)), out_MN
    (d_lhs, d_rhs), out = jax.grad(loss, argnums=(0, 1), has_aux=True)(lhs_MK, rhs_GKN)
    return out, d_lhs, d_rhs

  return jax.jit(value_and_grads)


def assert_close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=what)
  else:
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, atol=0.02 * scale, rtol=0.02, err_msg=what)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_kernel_equals_reference_and_ragged_dot(pattern, dtype):
  lhs_MK, rhs_GKN, probe_MN = operands(dtype)
  sizes_G = jnp.array(PATTERNS[pattern], jnp.int32)
  results = {impl: value_and_grads(impl)(lhs_MK, rhs_GKN, sizes_G, probe_MN) for impl in IMPLS}
  for impl in ("pallas", "mosaic", "tiled", "xla"):
    for name, got, want in zip(("out", "d_lhs", "d_rhs"), results[impl], results["reference"],
                               strict=True):
      assert got.dtype == want.dtype == dtype, (impl, name)
      assert got.shape == want.shape, (impl, name)
      assert_close(got, want, dtype, f"{impl} {name} {pattern}")
  for impl in ("pallas", "mosaic", "tiled"):
    out, d_lhs, d_rhs = results[impl]
    end = sum(PATTERNS[pattern])
    assert not np.asarray(out[end:], np.float32).any(), "rows past sum(group_sizes) must give 0"
    assert not np.asarray(d_lhs[end:], np.float32).any()
    for g, size in enumerate(PATTERNS[pattern]):
      if size == 0:
        assert not np.asarray(d_rhs[g], np.float32).any(), f"empty group {g} must get d_rhs 0"


@pytest.mark.parametrize("tiling,platform", [
    ((8, 8, 8), "triton"), ((8, 8, 8), "mosaic"), ((16, 32, 16), "triton"),
    ((16, 32, 16), "mosaic"), (gmm_lib.DEFAULT_TILING, "triton")], ids=str)
def test_tilings_agree(tiling, platform):
  """Tiles smaller than a group, wider than K, and the default (one tile covering M, K, N)."""
  lhs_MK, rhs_GKN, probe_MN = operands(jnp.float32, seed=1)
  sizes_G = jnp.array(PATTERNS["mixed"], jnp.int32)

  def loss(lhs_MK, rhs_GKN, gmm):
    return jnp.sum(gmm(lhs_MK, rhs_GKN, sizes_G) * probe_MN)

  kernel = functools.partial(gmm_lib.grouped_matmul, tiling=tiling, interpret=True,
                             platform=platform)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, gmm=kernel), argnums=(0, 1)))(
      lhs_MK, rhs_GKN)
  want = jax.value_and_grad(functools.partial(loss, gmm=jax.lax.ragged_dot), argnums=(0, 1))(
      lhs_MK, rhs_GKN)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("platform", gmm_lib.PLATFORMS)
def test_tgmm_is_the_per_group_transposed_product(platform):
  lhs_MK, _, probe_MN = operands(jnp.float32, seed=2)
  sizes = PATTERNS["mixed"]
  got = gmm_lib.tgmm(lhs_MK, probe_MN, jnp.array(sizes, jnp.int32), TILING, interpret=True,
                     platform=platform)
  assert got.shape == (4, K, N)
  start = 0
  for g, size in enumerate(sizes):
    rows = slice(start, start + size)
    want = np.asarray(lhs_MK[rows]).T @ np.asarray(probe_MN[rows])
    np.testing.assert_allclose(got[g], want, atol=1e-5, err_msg=f"group {g}")
    start += size


def test_bad_shapes_raise():
  lhs_MK, rhs_GKN, _ = operands(jnp.float32)
  with pytest.raises(ValueError, match="expected lhs"):
    gmm_lib.grouped_matmul(lhs_MK[:, :5], rhs_GKN, jnp.zeros((4,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="group_sizes"):
    gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, jnp.zeros((3,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="tiling"):
    gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, jnp.zeros((4,), jnp.int32), (16, 0, 16),
                           interpret=True)


def test_dispatch_interprets_exactly_on_cpu():
  assert dispatch.interpret("cpu")
  assert not dispatch.interpret("gpu") and not dispatch.interpret("tpu")
  assert jax.default_backend() == "cpu" and dispatch.interpret()
  pallas = dispatch.grouped_matmul_fn("pallas")
  assert pallas.func is gmm_lib.grouped_matmul and pallas.keywords == {"interpret": True}
  assert dispatch.grouped_matmul_fn("pallas", backend="gpu").keywords == {"interpret": False}
  assert dispatch.grouped_matmul_fn("xla") is jax.lax.ragged_dot
  assert dispatch.grouped_matmul_fn("reference") is gmm_lib.grouped_matmul_reference
  assert dispatch.grouped_matmul_fn("tiled") is tiled_gmm.tiled_grouped_matmul
  assert dispatch.grouped_matmul_fn("auto") is tiled_gmm.tiled_grouped_matmul  # CPU
  assert dispatch.grouped_matmul_fn("auto", backend="gpu") is jax.lax.ragged_dot
  with pytest.raises(ValueError, match=r"config\.model\.moe\.gmm"):
    dispatch.grouped_matmul_fn("triton")


def test_invalid_gmm_config_names_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.moe\.gmm=.triton."):
    tiny_config(moe=dict(num_experts=4, gmm="triton"))
  assert tiny_config(moe=dict(num_experts=4)).model.moe.gmm == "auto"


@pytest.mark.parametrize("gmm", ["pallas", "tiled", "reference"])
def test_moe_layer_with_gmm_equals_xla(mesh, gmm):
  """A tiny routed MoE (4 experts of width 16, top-2, capacity dropping so some rows fall past
  the groups): output and gradients w.r.t. input, router and expert weights match gmm=xla."""
  del mesh
  m = tiny_config(moe=dict(num_experts=4, top_k=2, d_ff=16, capacity_factor=0.5)).model
  layer = moe.MoE(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x_BTD = jax.random.normal(jax.random.key(0), (2, 8, 32))
  probe_BTD = jax.random.normal(jax.random.key(1), x_BTD.shape)

  def run(impl):
    def loss(state, x_BTD):
      mdl = nnx.merge(graphdef, state)
      mdl.gmm = impl
      y_BTD, aux = mdl(x_BTD)
      return jnp.sum(y_BTD * probe_BTD), (y_BTD, aux["moe/dropped"])
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(state, x_BTD)

  (gs_k, gx_k), (y_k, dropped) = run(gmm)
  (gs_x, gx_x), (y_x, _) = run("xla")
  assert float(dropped) > 0, "capacity 0.5 should drop assignments"
  np.testing.assert_allclose(y_k, y_x, atol=1e-5)
  np.testing.assert_allclose(gx_k, gx_x, atol=1e-5)
  for (path, g_k), (_, g_x) in zip(nnx.to_flat_state(gs_k), nnx.to_flat_state(gs_x), strict=True):
    np.testing.assert_allclose(g_k[...], g_x[...], atol=1e-5, err_msg=str(path))


def test_visits_of_a_straddling_pattern():
  """sizes (10, 0, 25, 7) over 50 rows in tiles of 16: the forward visits tile 0 for groups 0 and
  2, tiles 1 and 2 for group 2 and 3 (tile 2 straddles), tile 3 (rows 48-49, past the groups)
  once to write 0, then pads to 4 + 4 - 1 = 7 slots; tgmm visits in group order with one visit
  for the empty group 1."""
  offsets = gmm_lib.group_offsets(jnp.array([10, 0, 25, 7], jnp.int32), 50)
  fwd = gmm_lib.gmm_visits(offsets, 16, 64)
  np.testing.assert_array_equal(fwd.group, [0, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(fwd.tile, [0, 0, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(fwd.start, [0, 10, 10, 10, 35, 48, 48])
  np.testing.assert_array_equal(fwd.real_end, [10, 35, 35, 35, 42, 48, 48])
  np.testing.assert_array_equal(fwd.own_end, [10, 35, 35, 35, 64, 64, 64])
  np.testing.assert_array_equal(fwd.compute, [1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(fwd.live, [1, 1, 1, 1, 1, 1, 0])
  bwd = gmm_lib.tgmm_visits(offsets, 16, 64)
  np.testing.assert_array_equal(bwd.group, [0, 1, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(bwd.compute, [1, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(bwd.first, [1, 1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(bwd.last, [1, 1, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(bwd.live, [1, 1, 1, 1, 1, 1, 0])


def test_many_groups_large_k():
  """64 groups at K = 2048 with 40 rows (most groups empty, boundaries inside tiles), the TPU
  variant with tiles (16, 2048, 128). The old kernel's weight block here was (G, K, tn) =
  64 x 2048 x 128, 32 MiB in bfloat16 (64 MiB in float32), double-buffered: past every TPU's VMEM.
  The re-tiled kernel's blocks are (tm, tk), (tk, tn), (tm, tn) and a (tm, tn) float32
  accumulator. The forward and tgmm (d_rhs) == ragged_dot and its rhs gradient. (d_lhs is the
  forward kernel again, on rhs^T: covered at the small shapes; the interpreter copies the 64 MiB
  weight on every grid step, so it is left out here to keep the test fast.)"""
  m, k, n, groups = 40, 2048, 128, 64
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  lhs_MK = jax.random.normal(k1, (m, k))
  rhs_GKN = jax.random.normal(k2, (groups, k, n)) / np.sqrt(k)
  probe_MN = jax.random.normal(k3, (m, n))
  sizes = np.zeros(groups, np.int32)
  sizes[[1, 5, 6, 30, 63]] = [7, 12, 1, 15, 3]  # 38 rows: 2 past the groups
  sizes_G = jnp.asarray(sizes)
  tiling = (16, 2048, 128)
  out = jax.jit(functools.partial(gmm_lib.grouped_matmul, tiling=tiling, interpret=True,
                                  platform="mosaic"))(lhs_MK, rhs_GKN, sizes_G)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs_MK, rhs_GKN, sizes_G), atol=1e-4,
                             rtol=1e-4)
  d_rhs = jax.jit(functools.partial(gmm_lib.tgmm, tiling=tiling, interpret=True,
                                    platform="mosaic"))(lhs_MK, probe_MN, sizes_G)
  d_rhs_x = jax.grad(lambda r: jnp.sum(jax.lax.ragged_dot(lhs_MK, r, sizes_G) * probe_MN))(
      rhs_GKN)
  np.testing.assert_allclose(d_rhs, d_rhs_x, atol=1e-4, rtol=1e-4)
  assert not np.asarray(out[38:]).any() and not np.asarray(d_rhs[0]).any()


def test_bench_legacy_tiling_equals_ragged_dot():
  """bench/kernels.py's previous tiling (kept for comparison) computes the same forward."""
  from bench import legacy_grouped_matmul as legacy_gmm
  lhs_MK, rhs_GKN, _ = operands(jnp.float32, seed=3)
  sizes_G = jnp.array(PATTERNS["mixed"], jnp.int32)
  got = jax.jit(functools.partial(legacy_gmm.legacy_grouped_matmul, tiling=TILING,
                                  interpret=True))(lhs_MK, rhs_GKN, sizes_G)
  np.testing.assert_allclose(got, jax.lax.ragged_dot(lhs_MK, rhs_GKN, sizes_G), atol=1e-5)


def _patch_tpu_info(monkeypatch):
  """Mosaic's lowering asks the local device for TPU facts (tiling, generation); on this CPU
  host say it is a TPU v5 lite with one core. Only lowering is exercised, nothing runs."""
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)


@pytest.mark.parametrize("platform,marker", [("cuda", "custom_call @__gpu$xla.gpu.triton"),
                                             ("tpu", "tpu_custom_call")])
def test_kernel_lowers(platform, marker, monkeypatch):
  """Cross-platform lowering from this CPU host (no GPU or TPU needed, nothing compiled or run):
  the forward emits one custom call, the gradient two (d_lhs and tgmm; the forward is dead),
  Triton for cuda (not Mosaic GPU), Mosaic for tpu. Tiles of 128, bfloat16."""
  if platform == "tpu":
    _patch_tpu_info(monkeypatch)
  lhs_MK = jnp.zeros((256, 128), jnp.bfloat16)
  rhs_GKN = jnp.zeros((4, 128, 256), jnp.bfloat16)
  sizes_G = jnp.array([64, 0, 100, 92], jnp.int32)

  def loss(lhs_MK, rhs_GKN):
    out_MN = gmm_lib.grouped_matmul(lhs_MK, rhs_GKN, sizes_G, interpret=False)
    return jnp.sum(out_MN.astype(jnp.float32))

  for fn, calls in ((loss, 1), (jax.grad(loss, argnums=(0, 1)), 2)):
    text = jax.jit(fn).trace(lhs_MK, rhs_GKN).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == calls, (platform, calls)
    assert "mosaic_gpu" not in text
