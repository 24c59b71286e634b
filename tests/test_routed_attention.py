"""Routed attention (docs/kernels.md): the Pallas kernel in interpret mode == its jnp reference ==
the XLA path, in values and in the gradients w.r.t. q, k and v; the reference == a plain masked
einsum; a model trained with attention_impl=pallas == xla; the visit metadata; the dispatch rule;
lowering for cuda (Triton) and tpu (Mosaic) from this CPU host.

Shapes are tiny (interpret mode is slow): T = 13 queries, S = 21 keys, blocks of 8, so both axes
are padded and several blocks are visited. Tolerances: float32 atol 2e-5 (Dh = 8); bfloat16
inputs: atol 3% of the largest |entry| of the float32 reference (the kernel rounds p to bf16
before p v, the reference does not).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research.kernels import dispatch, xla_attention
from research.kernels import routed_attention as ra
from tests.model_util import fit, random_batch, tiny_config, train_setup

B, T, S, H, KV, DH = 2, 13, 21, 4, 2, 8
BLOCK = 8


def case(kind: str, dtype, seed: int = 0):
  """(q, k, v, q_idx, q_seg, kv_idx, kv_seg) for one routing pattern.

  full_keys: a sorted subset of T of the S tokens against every key (MoR KV sharing); row 1 has
    padding at its end. 'self': the subset against itself (MoR recursion-wise caching).
  unsorted: full keys, the query subset in a shuffled order (block skipping must stay correct).
  masked_rows: some queries are padding (seg 0) and row 1's keys are all padding after 5.
  decode: 3 queries at the end of a cache of S slots of which 16 are filled.
  """
  ks = jax.random.split(jax.random.key(seed), 6)
  kv_idx = jnp.tile(jnp.arange(S, dtype=jnp.int32), (B, 1))
  kv_seg = jnp.array([[1] * 7 + [2] * 9 + [3] * 5, [1] * 17 + [0] * 4], jnp.int32)
  pick = jnp.sort(jax.random.choice(ks[0], S, (T,), replace=False))
  q_idx = jnp.tile(pick.astype(jnp.int32), (B, 1))
  t = T
  if kind == "unsorted":
    q_idx = q_idx[:, jax.random.permutation(ks[1], T)]
  if kind == "masked_rows":
    kv_seg = kv_seg.at[1, 5:].set(0)
  if kind == "decode":
    t = 3
    kv_seg = kv_seg.at[:, 16:].set(0)
    q_idx = jnp.tile(jnp.arange(13, 16, dtype=jnp.int32), (B, 1))
  q_seg = jnp.take_along_axis(kv_seg, q_idx, axis=1)
  if kind == "masked_rows":
    q_seg = q_seg.at[0, ::3].set(0)
  q = jax.random.normal(ks[2], (B, t, H, DH)).astype(dtype)
  k = jax.random.normal(ks[3], (B, S, KV, DH)).astype(dtype)
  v = jax.random.normal(ks[4], (B, S, KV, DH)).astype(dtype)
  if kind == "self":
    k, v = k[:, :T], v[:, :T]
    kv_idx, kv_seg = q_idx, q_seg
  return q, k, v, q_idx, q_seg, kv_idx, kv_seg


KERNEL = functools.partial(ra.routed_attention, block_q=BLOCK, block_k=BLOCK, interpret=True)


@functools.cache
def value_and_grads(impl: str, causal: bool, cross_segments: bool):
  """jitted (out, d<out, probe>/dq, dk, dv)."""
  fn = {"pallas": KERNEL, "reference": ra.routed_attention_reference,
        "xla": xla_attention.xla_attention}[impl]

  def run(q, k, v, q_idx, q_seg, kv_idx, kv_seg, probe):
    def loss(q, k, v):
      out = fn(q, k, v, q_idx, q_seg, kv_idx, kv_seg, causal=causal,
               cross_segments=cross_segments)
      return jnp.sum(out.astype(jnp.float32) * probe), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)

  return jax.jit(run)


def assert_close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=what)
  else:
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, atol=0.03 * scale, rtol=0.03, err_msg=what)


GRID = [  # (kind, causal, cross_segments, dtype)
    ("full_keys", True, False, jnp.float32),
    ("self", True, False, jnp.float32),
    ("unsorted", True, False, jnp.float32),
    ("masked_rows", True, False, jnp.float32),
    ("decode", True, False, jnp.float32),
    ("self", False, True, jnp.float32),
    ("full_keys", True, True, jnp.bfloat16),
    ("masked_rows", False, False, jnp.bfloat16),
]


@pytest.mark.parametrize("kind,causal,cross,dtype", GRID,
                         ids=[f"{k}-{'causal' if c else 'full'}-{'cross' if x else 'seg'}-"
                              f"{jnp.dtype(d).name}" for k, c, x, d in GRID])
def test_kernel_equals_reference(kind, causal, cross, dtype):
  args = case(kind, dtype)
  probe = jax.random.normal(jax.random.key(7), args[0].shape)
  got = value_and_grads("pallas", causal, cross)(*args, probe)
  # The float32 reference on the same (rounded) inputs is the target for both dtypes.
  want = value_and_grads("reference", causal, cross)(
      *(a.astype(jnp.float32) for a in args[:3]), *args[3:], probe)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    assert g.dtype == dtype and g.shape == w.shape, name
    assert_close(g, w, dtype, f"{name} {kind}")
  mask = ra.attention_mask(*args[3:], causal=causal, cross_segments=cross)
  reads_nothing = ~np.asarray(mask.any(-1))
  assert not np.asarray(got[0], np.float32)[reads_nothing].any(), "empty rows must give 0"
  assert not np.asarray(got[1], np.float32)[reads_nothing].any(), "empty rows get dq 0"
  if kind == "masked_rows":
    assert reads_nothing.any() and not np.asarray(got[2], np.float32)[1, 5:].any()


@pytest.mark.parametrize("kind,causal", [("full_keys", True), ("self", True),
                                         ("masked_rows", False)])
def test_reference_and_xla_equal_the_model_attention(kind, causal):
  """routed_attention_reference and xla_attention (the model's XLA path) == the plain masked
  einsum softmax over routed_attention's mask, float32."""
  q, k, v, q_idx, q_seg, kv_idx, kv_seg = case(kind, jnp.float32)
  mask = ra.attention_mask(q_idx, q_seg, kv_idx, kv_seg, causal=causal, cross_segments=False)
  want = xla_attention.masked_attention(q, k, v, mask)
  for fn in (ra.routed_attention_reference, xla_attention.xla_attention):
    got = fn(q, k, v, q_idx, q_seg, kv_idx, kv_seg, causal=causal, cross_segments=False)
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=fn.__name__)


def test_xla_block_causal_equals_masked():
  """sorted_self_attention (block-causal, blocks of 32 over T = 70) == the full masked path."""
  ks = jax.random.split(jax.random.key(3), 3)
  t = 70
  q = jax.random.normal(ks[0], (1, t, H, DH))
  k, v = (jax.random.normal(kk, (1, t, KV, DH)) for kk in ks[1:])
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.array([[1] * 30 + [2] * 35 + [0] * 5], jnp.int32)
  args = (q, k, v, idx, seg, idx, seg)
  got = jax.jit(functools.partial(xla_attention.xla_attention, causal=True,
                                  cross_segments=False, sorted_self_attention=True))(*args)
  want = jax.jit(functools.partial(ra.routed_attention_reference, causal=True,
                                   cross_segments=False))(*args)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_visits_skip_blocks_above_the_diagonal_and_stay_exact():
  """Sorted self-attention of 32 tokens in blocks of 8: q block i visits kv blocks 0..i only;
  padding blocks are visited by nobody; an unsorted order visits more but never misses a pair."""
  idx = jnp.arange(32, dtype=jnp.int32)[None]
  seg = jnp.array([[1] * 24 + [0] * 8], jnp.int32)
  vis = ra._visits(idx, seg, idx, seg, causal=True, cross_segments=False, block_q=8, block_k=8)
  np.testing.assert_array_equal(vis.kv_count[0], [1, 2, 3, 0])
  np.testing.assert_array_equal(vis.kv_list[0, 2, :3], [0, 1, 2])
  np.testing.assert_array_equal(vis.q_count[0], [3, 2, 1, 0])
  np.testing.assert_array_equal(vis.q_list[0, 1, :2], [1, 2])
  perm = jax.random.permutation(jax.random.key(0), 32)
  q_idx, q_seg = idx[:, perm], seg[:, perm]
  vis = ra._visits(q_idx, q_seg, idx, seg, causal=True, cross_segments=False, block_q=8,
                   block_k=8)
  mask = np.asarray(ra.attention_mask(q_idx, q_seg, idx, seg, causal=True, cross_segments=False))
  needed = mask[0].reshape(4, 8, 4, 8).any(axis=(1, 3))
  for i in range(4):
    visited = set(np.asarray(vis.kv_list[0, i, :vis.kv_count[0, i]]).tolist())
    assert set(np.nonzero(needed[i])[0].tolist()) <= visited, i


def test_mosaic_variant_in_interpret_mode():
  """The scalar-prefetch (TPU) variant of the same kernels, interpreted, == the reference."""
  args = case("full_keys", jnp.float32)
  fn = functools.partial(ra.routed_attention, causal=True, cross_segments=False, block_q=BLOCK,
                         block_k=BLOCK, interpret=True, platform="mosaic")
  probe = jax.random.normal(jax.random.key(7), args[0].shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, *args[3:]) * probe)

  ref = functools.partial(ra.routed_attention_reference, causal=True, cross_segments=False)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(*args[:3])
  want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2))(*args[:3])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-5)


def test_bad_shapes_raise():
  q, k, v, q_idx, q_seg, kv_idx, kv_seg = case("full_keys", jnp.float32)
  with pytest.raises(ValueError, match="H % K"):
    KERNEL(q[:, :, :3], k, v, q_idx, q_seg, kv_idx, kv_seg, causal=True, cross_segments=False)
  with pytest.raises(ValueError, match="kv_idx"):
    KERNEL(q, k, v, q_idx, q_seg, kv_idx[:, :4], kv_seg, causal=True, cross_segments=False)


def test_attention_dispatch():
  assert dispatch.attention_impl("auto", "cpu") == "xla"
  assert dispatch.attention_impl("auto", "gpu") == dispatch.attention_impl("auto", "tpu") == (
      "pallas")
  assert dispatch.attention_fn("xla") is xla_attention.xla_attention
  assert dispatch.attention_fn("auto", "cpu") is xla_attention.xla_attention
  assert dispatch.attention_fn("pallas").keywords == {"interpret": True}
  assert dispatch.attention_fn("pallas", "gpu").keywords == {"interpret": False}
  assert dispatch.attention_fn("auto", "tpu").keywords == {"interpret": False}
  with pytest.raises(ValueError, match=r"config\.model\.attention_impl"):
    dispatch.attention_fn("flash")
  # Every implementation takes the one signature (sorted_self_attention included).
  args = case("self", jnp.float32)
  outs = [dispatch.attention_fn(impl)(*args, causal=True, cross_segments=False,
                                      sorted_self_attention=True)
          for impl in ("xla", "pallas", "reference")]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=2e-5)
  # ... and the row-keys promise (KV sharing: sorted queries over the row's keys).
  args = case("full_keys", jnp.float32)
  outs = [dispatch.attention_fn(impl)(*args, causal=True, cross_segments=False,
                                      sorted_queries_row_keys=True)
          for impl in ("xla", "pallas", "reference")]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=2e-5)


def test_xla_row_keys_skip_equals_masked():
  """sorted_queries_row_keys (MoR KV sharing: T sorted queries over the row's S keys, blocks of
  32 over T = 70 of S = 100) == the full masked path, values and gradients, on the CPU flash path
  and on the masked blocks of the other backends."""
  ks = jax.random.split(jax.random.key(4), 5)
  t, s = 70, 100
  q = jax.random.normal(ks[0], (2, t, H, DH))
  k, v = (jax.random.normal(kk, (2, s, KV, DH)) for kk in ks[1:3])
  kv_idx = jnp.tile(jnp.arange(s, dtype=jnp.int32), (2, 1))
  kv_seg = jnp.array([[1] * 40 + [2] * 60, [1] * 90 + [0] * 10], jnp.int32)
  q_idx = jnp.stack([jnp.sort(jax.random.choice(kk, s, (t,), replace=False)) for kk in
                     jax.random.split(ks[3], 2)]).astype(jnp.int32)
  q_seg = jnp.take_along_axis(kv_seg, q_idx, axis=1).at[0, ::5].set(0)  # some padding slots
  probe = jax.random.normal(ks[4], q.shape)
  meta = (q_idx, q_seg, kv_idx, kv_seg)

  def loss(fn):
    return jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(fn(q, k, v, *meta) * probe), argnums=(0, 1, 2)))

  want_fn = functools.partial(ra.routed_attention_reference, causal=True, cross_segments=False)
  want = loss(want_fn)(q, k, v)
  fast = functools.partial(xla_attention.xla_attention, causal=True, cross_segments=False,
                           sorted_queries_row_keys=True)
  blocks = lambda q, k, v, *m: xla_attention.prefix_causal_attention(
      q, k, v, *m, cross_segments=False, block=32)
  for fn in (fast, blocks):
    got = loss(fn)(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
  assert xla_attention.key_ends(70, 100, 32, row_keys=True) == (62, 94, 100)
  assert xla_attention.key_ends(70, 70, 32, row_keys=False) == (32, 64, 70)


def test_invalid_attention_impl_config_names_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.attention_impl=.flash."):
    tiny_config(attention_impl="flash")
  assert tiny_config().model.attention_impl == "auto"


def _patch_tpu_info(monkeypatch):
  """Mosaic's lowering asks the local device for TPU facts (tiling, generation); on this CPU
  host say it is a TPU v5 lite with one core. Only lowering is exercised, nothing runs."""
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)


@pytest.mark.parametrize("platform,marker", [("cuda", "custom_call @__gpu$xla.gpu.triton"),
                                             ("tpu", "tpu_custom_call")])
def test_kernel_lowers(platform, marker, monkeypatch):
  """Forward and gradient lower to one custom call per kernel (fwd; fwd + dq + dkv) from this
  CPU host with blocks of 128, bfloat16; nothing is compiled or run."""
  if platform == "tpu":
    _patch_tpu_info(monkeypatch)
  q = jnp.zeros((1, 200, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 300, 2, 128), jnp.bfloat16)
  q_idx, kv_idx = jnp.zeros((1, 200), jnp.int32), jnp.zeros((1, 300), jnp.int32)

  def loss(q, k, v):
    out = ra.routed_attention(q, k, v, q_idx, q_idx, kv_idx, kv_idx, causal=True,
                              cross_segments=False, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  for fn, calls in ((loss, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == calls, (platform, calls)
    assert "mosaic_gpu" not in text


def test_a_model_trained_with_the_pallas_kernel_matches_xla():
  """Three train steps of a tiny MoR model with KV sharing (self-attention, and subset queries
  over recursion 1's keys) give the same losses with attention_impl=pallas (interpret mode) as
  with xla."""
  losses = {}
  for impl in ("xla", "pallas"):
    cfg = tiny_config(num_layers=5, attention_impl=impl)
    cfg.model.recursion.update(strategy="middle_cycle", num_recursions=3)
    cfg.model.mor.update(kind="expert", kv="share")
    state, step = train_setup(cfg, 3)
    _, _, losses[impl] = fit(state, step, random_batch(2), 3)
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
  assert losses["xla"][-1] < losses["xla"][0]
