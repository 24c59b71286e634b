"""The fast attention and projection paths against the plain, obvious ones, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.kernels import routed_attention as ra
from research.kernels import xla_attention as xa
from research.model import layers
from tests.model_util import tiny_config

H, K, DH = 4, 2, 8  # query heads, kv heads (GQA), head width


def random_segments(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
  """Packed rows: documents of random lengths (ids 1, 2, ...), padding (0) at the end of some
  rows and at random places in others."""
  seg = np.zeros((b, t), np.int32)
  for row in range(b):
    pos, doc = 0, 1
    end = t - int(rng.integers(0, max(1, t // 3))) if row % 2 == 0 else t
    while pos < end:
      n = int(rng.integers(1, max(2, t // 2)))
      seg[row, pos:min(pos + n, end)] = doc
      pos, doc = pos + n, doc + 1
    if row % 2:
      seg[row, rng.random(t) < 0.2] = 0
  return seg


def tokens(seg_BT: np.ndarray, indices_BT: np.ndarray | None = None) -> layers.Tokens:
  b, t = seg_BT.shape
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)) if indices_BT is None else indices_BT
  return layers.Tokens(positions=jnp.asarray(idx, jnp.int32), segments=jnp.asarray(seg_BT),
                       indices=jnp.asarray(idx, jnp.int32))


def qkv(rng: np.random.Generator, b: int, t: int) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(rng.normal(size=(b, t, n, DH)), jnp.float32) for n in (H, K, K))


def masked_reference(q, k, v, tok, cross):
  mask = ra.attention_mask(tok.indices, tok.segments, tok.indices, tok.segments, causal=True,
                           cross_segments=cross)
  return xa.masked_attention(q, k, v, mask)


def value_and_vjp(f, args, cot=None):
  """(f(*args), its VJP of `cot`; None when cot is None) as one jitted call: eager op-by-op
  dispatch of the block loops costs far more than one small compilation."""
  def run(args, cot):
    out, vjp = jax.vjp(f, *args)
    return out, (None if cot is None else vjp(cot))
  return jax.jit(run)(args, cot)


def assert_same_values_and_grads(fast, slow, args, rng, atol=1e-6):
  """fast(*args) == slow(*args), and so are the VJPs of one random cotangent (both jitted)."""
  out_slow, _ = value_and_vjp(slow, args)
  cot = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype), out_slow)
  pairs = (value_and_vjp(fast, args, cot), value_and_vjp(slow, args, cot))
  for fast_tree, slow_tree in zip(*pairs, strict=True):
    for a, b in zip(jax.tree.leaves(fast_tree), jax.tree.leaves(slow_tree), strict=True):
      np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("t,block,cross", [(1, 1, False), (5, 2, False), (16, 4, False),
                                           (23, 8, False), (23, 5, True), (23, 64, False),
                                           (9, 9, True)])
def test_block_causal_equals_the_masked_path(t, block, cross):
  """Every row (padding rows read nothing and give 0) and every gradient, T not always a
  multiple of the block, packed documents and padding."""
  rng = np.random.default_rng(t * 100 + block)
  tok = tokens(random_segments(rng, 4, t))
  fast = lambda q, k, v: xa.block_causal_attention(q, k, v, tok.indices, tok.segments,
                                                   cross_segments=cross, block=block)
  slow = lambda q, k, v: masked_reference(q, k, v, tok, cross)
  assert_same_values_and_grads(fast, slow, qkv(rng, 4, t), rng)


def test_block_causal_on_a_gathered_subset_equals_the_masked_path():
  """A sorted subset of each row's tokens with some slots marked padding (the MoR gather):
  the indices still ascend, so skipping keys after each block is exact."""
  rng = np.random.default_rng(7)
  b, t, n = 3, 21, 13
  full = tokens(random_segments(rng, b, t))
  idx_BN = jnp.asarray(np.sort(np.stack([rng.choice(t, n, replace=False) for _ in range(b)]), 1))
  sub = full.take(idx_BN)
  sub = sub._replace(segments=jnp.where(jnp.asarray(rng.random((b, n)) < 0.25), 0, sub.segments))
  fast = lambda q, k, v: xa.block_causal_attention(q, k, v, sub.indices, sub.segments,
                                                   cross_segments=False, block=4)
  slow = lambda q, k, v: masked_reference(q, k, v, sub, False)
  assert_same_values_and_grads(fast, slow, qkv(rng, b, n), rng)


@pytest.mark.parametrize("t,block,cross", [(1, 1, False), (5, 2, False), (16, 4, False),
                                           (23, 8, False), (23, 5, True), (23, 64, False),
                                           (9, 9, True)])
def test_flash_self_attention_equals_the_masked_path(t, block, cross):
  """The CPU path (flash_attention: one custom VJP over the blocks) == the plain masked softmax,
  every row and every gradient, packed documents and padding (rows that read nothing give 0)."""
  rng = np.random.default_rng(t * 100 + block + 1)
  tok = tokens(random_segments(rng, 4, t))
  ends = xa.key_ends(t, t, block, row_keys=False)
  fast = lambda q, k, v: xa.flash_attention(q, k, v, tok.indices, tok.segments, tok.indices,
                                            tok.segments, cross_segments=cross, ends=ends,
                                            block=block)
  slow = lambda q, k, v: masked_reference(q, k, v, tok, cross)
  # atol 2e-6: the backward's D = rowsum(dO O) rounds differently from autodiff's softmax VJP
  assert_same_values_and_grads(fast, slow, qkv(rng, 4, t), rng, atol=2e-6)
  if t == 5:  # the custom VJP also outside jit (op by op: slow, so one small shape only)
    args = qkv(rng, 4, t)
    out, vjp = jax.vjp(fast, *args)
    want, want_vjp = value_and_vjp(slow, args, jnp.ones_like(out))
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    for a, b in zip(vjp(jnp.ones_like(out)), want_vjp, strict=True):
      np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block,cross", [(4, False), (3, True), (32, False)])
def test_flash_row_keys_equals_the_masked_path(block, cross):
  """MoR KV sharing: a gathered subset of each row's tokens (distinct ascending indices, some
  slots padding) over all the row's keys in index order; query block [s, e) reads keys
  [0, S - T + e) only."""
  rng = np.random.default_rng(11 + block)
  b, s, n = 3, 23, 14
  full = tokens(random_segments(rng, b, s))
  idx_BN = jnp.asarray(np.sort(np.stack([rng.choice(s, n, replace=False) for _ in range(b)]), 1))
  sub = full.take(idx_BN)
  sub = sub._replace(segments=jnp.where(jnp.asarray(rng.random((b, n)) < 0.25), 0, sub.segments))
  mask = ra.attention_mask(sub.indices, sub.segments, full.indices, full.segments, causal=True,
                           cross_segments=cross)
  q = jnp.asarray(rng.normal(size=(b, n, H, DH)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, s, K, DH)), jnp.float32) for _ in range(2))
  ends = xa.key_ends(n, s, block, row_keys=True)
  meta = (sub.indices, sub.segments, full.indices, full.segments)
  fast = lambda q, k, v: xa.flash_attention(q, k, v, *meta, cross_segments=cross, ends=ends,
                                            block=block)
  blocks = lambda q, k, v: xa.prefix_causal_attention(q, k, v, *meta, cross_segments=cross,
                                                      block=block)
  slow = lambda q, k, v: xa.masked_attention(q, k, v, mask)
  assert_same_values_and_grads(fast, slow, (q, k, v), rng, atol=2e-6)
  assert_same_values_and_grads(blocks, slow, (q, k, v), rng)


def test_kv_sharing_promises_row_keys_only_outside_a_decode_cache(monkeypatch):
  """Attention.forward reading recursion 1's shared K/V sets sorted_queries_row_keys in training
  and prefill without a cache, not while decoding; self-attention keeps sorted_self_attention."""
  cfg = tiny_config().model
  with nnx.use_eager_sharding(False):
    attn = layers.Attention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  seen = []

  def record(*args, **kw):
    seen.append({k: kw.get(k, False) for k in ("sorted_self_attention",
                                               "sorted_queries_row_keys")})
    return xa.xla_attention(*args, **kw)

  monkeypatch.setattr(layers.dispatch, "attention_fn", lambda impl: record)
  rng = np.random.default_rng(3)
  b, t = 2, 9
  tok = tokens(np.ones((b, t), np.int32))
  x = jnp.asarray(rng.normal(size=(b, t, cfg.d_model)), jnp.float32)
  _, kv = attn.forward(x, tok, site=layers.Site("core/0", keep=True))
  sub = tok.take(jnp.asarray([[0, 2, 3, 7], [1, 4, 5, 8]]))
  want = attn.forward(x[:, :4], sub, site=layers.Site(shared="core/0"), kv=kv)[0]
  got = attn.forward(x[:, :4], sub, site=layers.Site(shared="core/0"), kv=kv, decoding=True)[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert seen == [{"sorted_self_attention": True, "sorted_queries_row_keys": False},
                  {"sorted_self_attention": False, "sorted_queries_row_keys": True},
                  {"sorted_self_attention": False, "sorted_queries_row_keys": False}]


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
def test_matmul_vjp_equals_autodiff_of_the_dot(shape):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(shape[-1], 4)), jnp.float32)
  assert_same_values_and_grads(jax.jit(layers.matmul), lambda x, w: x @ w, (x, w), rng)


@pytest.mark.parametrize("entry", ["none", "pair", "gated"])
def test_project_equals_the_linear_layer_plus_its_lora(entry):
  """project = nnx.Linear's own call + ((x A) * gate) B, values and gradients (the backward of
  `matmul` replaces autodiff's)."""
  rng = np.random.default_rng(6)
  b, t, d, r, o = 3, 4, 5, 2, 7
  with nnx.use_eager_sharding(False):
    lin = nnx.Linear(d, o, use_bias=False, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(lin)
  lora = {}
  if entry != "none":
    lora["p"] = (jnp.asarray(rng.normal(size=(d, r)), jnp.float32),
                 jnp.asarray(rng.normal(size=(r, o)), jnp.float32))
  if entry == "gated":
    lora["p"] += (jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)

  def fast(x, params, lora):
    return layers.project(nnx.merge(graphdef, params), "p", x, lora)

  def slow(x, params, lora):
    y = nnx.merge(graphdef, params)(x)
    if not lora:
      return y
    a, b_, *gate = lora["p"]
    h = x @ a
    return y + (h * gate[0][:, None, :] if gate else h) @ b_

  assert_same_values_and_grads(fast, slow, (x, params, lora), rng)


def test_attention_module_equals_its_unfused_masked_reference(monkeypatch):
  """Attention.__call__ (blocks of 4 over 11 tokens) against the full masked T x T path, with
  per-projection LoRA, documents and padding."""
  cfg = tiny_config().model
  with nnx.use_eager_sharding(False):
    attn = layers.Attention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(5)
  b, t, d, r = 2, 11, cfg.d_model, 2
  tok = tokens(random_segments(rng, b, t))
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  lora = {name: (jnp.asarray(0.3 * rng.normal(size=(d, r)), jnp.float32),
                 jnp.asarray(0.3 * rng.normal(size=(r, getattr(attn, name).out_features)),
                             jnp.float32))
          for name in ("q_proj", "v_proj", "o_proj")}

  def reference(x, lora):
    proj = {n: layers.project(getattr(attn, n), n, x, lora) for n in ("q_proj", "k_proj", "v_proj")}
    q = layers.apply_rope(proj["q_proj"].reshape(b, t, -1, cfg.head_dim), tok.positions,
                          attn.rope_theta)
    k = layers.apply_rope(proj["k_proj"].reshape(b, t, -1, cfg.head_dim), tok.positions,
                          attn.rope_theta)
    v = proj["v_proj"].reshape(b, t, -1, cfg.head_dim)
    out = masked_reference(q, k, v, tok, attn.cross_segments).reshape(b, t, -1)
    return layers.project(attn.o_proj, "o_proj", out, lora)

  monkeypatch.setattr(xa, "causal_block", lambda t: 4)
  assert_same_values_and_grads(lambda x, lora: attn(x, tok, lora), reference, (x, lora), rng,
                               atol=1e-5)


def test_causal_block_is_an_eighth_of_the_row_and_at_least_32():
  assert [xa.causal_block(t) for t in (16, 256, 2048, 2049)] == [32, 32, 256, 257]
