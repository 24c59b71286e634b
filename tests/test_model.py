"""The language model against slow, obvious references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.kernels import routed_attention as ra
from research.kernels import xla_attention as xa
from research.model import layers
from research.model.lm import LanguageModel
from tests.model_util import tiny_config


def naive_attention(q, k, v, mask):
  """Loop over batch, head and query: softmax(q.k / sqrt(d)) over allowed keys."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        allowed = np.nonzero(mask[bi, i])[0]
        if not len(allowed):
          continue
        s = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in allowed]) / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, hi] = sum(pj * v[bi, j, hi // group] for pj, j in zip(p, allowed, strict=True))
  return out


def random_tokens(b, t, seed=0, segments=None):
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.ones((b, t), jnp.int32) if segments is None else jnp.asarray(segments, jnp.int32)
  return layers.Tokens(positions=idx, segments=seg, indices=idx)


def mask_of(q: layers.Tokens, kv: layers.Tokens) -> jax.Array:
  """The causal, same-document, no-padding mask the model's attention uses."""
  return ra.attention_mask(q.indices, q.segments, kv.indices, kv.segments, causal=True,
                           cross_segments=False)


def test_attention_matches_loop_reference_with_gqa_and_segments():
  rng = np.random.default_rng(0)
  b, t, h, kv, d = 2, 7, 4, 2, 8
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in
             [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
  tok = random_tokens(b, t, segments=[[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
  mask = mask_of(tok, tok)
  got = xa.masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  want = naive_attention(q, k, v, np.asarray(mask))  # 0 for the padding query: it reads nothing
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_on_gathered_tokens_equals_full_attention_restricted():
  """A subset of tokens attends causally by ORIGINAL index: the MoR gather relies on this."""
  rng = np.random.default_rng(1)
  b, t, h, d = 1, 9, 2, 4
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  tok = random_tokens(b, t)
  sel = jnp.array([[0, 2, 3, 7]])
  sub = tok.take(sel)
  take = lambda x: jnp.take_along_axis(x, sel[:, :, None, None], axis=1)
  got = xa.masked_attention(take(q), take(k), take(v), mask_of(sub, sub))
  in_subset = jnp.zeros((b, t), bool).at[0, sel[0]].set(True)
  full_mask = mask_of(tok, tok) & in_subset[:, None, :]
  want = take(xa.masked_attention(q, k, v, full_mask))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_rope_matches_complex_rotation_and_is_relative():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 3, 1, 8)).astype(np.float32)
  pos = jnp.array([[0, 5, 11]])
  got = np.asarray(layers.apply_rope(jnp.asarray(x), pos, 10_000.0))
  half = 4
  freq = 1.0 / 10_000.0 ** (np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.asarray(pos)[..., None, None] * freq)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)
  # <R(p) q, R(p') k> depends only on p - p'.
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  dot = lambda p1, p2: float(jnp.sum(layers.apply_rope(q, jnp.array([[p1]]), 1e4)
                                     * layers.apply_rope(k, jnp.array([[p2]]), 1e4)))
  assert dot(7, 3) == pytest.approx(dot(14, 10), abs=1e-5)


def test_rmsnorm_matches_formula():
  with nnx.use_eager_sharding(False):
    norm = layers.RMSNorm(6, eps=1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(3).normal(size=(2, 6)).astype(np.float32)
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, atol=1e-6)


@pytest.fixture(scope="module")
def model():
  with nnx.use_eager_sharding(False):
    return LanguageModel(tiny_config().model, rngs=nnx.Rngs(0))


def test_logits_are_causal(model):
  tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 64)
  changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % 64)
  a, _, _ = model(tokens)
  b, _, _ = model(changed)
  np.testing.assert_array_equal(a[0, :6], b[0, :6])
  assert not np.allclose(a[0, 6:], b[0, 6:])


@pytest.mark.parametrize("cross", [False, True])
def test_packed_documents_do_not_see_each_other(cross):
  with nnx.use_eager_sharding(False):
    m = LanguageModel(tiny_config(attend_across_segments=cross).model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 64)
  seg = jnp.array([[1] * 4 + [2] * 6])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
  changed = tokens.at[0, 1].set((tokens[0, 1] + 1) % 64)
  a, _, _ = m(tokens, pos, seg)
  b, _, _ = m(changed, pos, seg)
  same = np.allclose(a[0, 4:], b[0, 4:], atol=0)
  assert same == (not cross)


def test_first_document_token_matches_unpacked_run(model):
  """Doc 2 packed after doc 1 gives the same logits as doc 2 on its own."""
  doc1 = jax.random.randint(jax.random.key(2), (1, 5), 0, 64)
  doc2 = jax.random.randint(jax.random.key(3), (1, 6), 0, 64)
  packed = jnp.concatenate([doc1, doc2], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 6])
  pos = jnp.array([list(range(5)) + list(range(6))])
  got, _, _ = model(packed, pos, seg)
  want, _, _ = model(doc2)
  np.testing.assert_allclose(got[0, 5:], want[0], atol=1e-5)


def test_param_count_and_init(model):
  cfg = tiny_config().model
  params = nnx.state(model, nnx.Param)
  n = sum(x.size for x in jax.tree.leaves(params))
  d, f, v, dh = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
  per_layer = d * dh * (cfg.num_heads * 2 + cfg.num_kv_heads * 2) + 3 * d * f + 2 * d
  assert n == v * d + cfg.num_layers * per_layer + d  # tied head: no extra matrix
  emb = np.asarray(model.embed.embedding[...])
  assert abs(emb.std() - 0.02) < 0.002
  with nnx.use_eager_sharding(False):
    untied = LanguageModel(tiny_config(tie_embeddings=False).model, rngs=nnx.Rngs(0))
  m = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
  assert m == n + d * v


def test_bfloat16_compute_keeps_float32_params_and_logits():
  with nnx.use_eager_sharding(False):
    m = LanguageModel(tiny_config(compute_dtype="bfloat16").model, rngs=nnx.Rngs(0))
  logits, _, _ = m(jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32
  assert m.core.blocks[0].attn.q_proj.kernel[...].dtype == jnp.float32
