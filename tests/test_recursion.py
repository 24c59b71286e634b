"""Layer tying and relaxation: plans, tied gradients, LoRA, and the papers' parameter counts."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from configs import base
from research import config as config_lib
from research.model import recursion
from research.model.layers import Tokens
from research.model.lm import LanguageModel
from tests.model_util import tiny_config


@pytest.mark.parametrize("strategy,want", [
    ("cycle", (0, [0, 1, 2, 0, 1, 2, 0, 1, 2], 0)),
    ("sequence", (0, [0, 0, 0, 1, 1, 1, 2, 2, 2], 0)),
    ("middle_cycle", (1, [0, 1, 0, 1, 0, 1], 1)),
    ("middle_sequence", (1, [0, 0, 0, 1, 1, 1], 1)),
])
def test_plans_follow_the_paper_maps(strategy, want):
  num_layers = 9 if strategy in ("cycle", "sequence") else 8
  plan = recursion.make_plan(strategy, num_layers, 3)
  assert (plan.prelude, list(plan.order), plan.coda) == want
  assert plan.num_layers == num_layers
  # the paper's formulas (mor.md §1.2) over the unrolled depths d
  for d, j in enumerate(plan.order, start=plan.prelude):
    if strategy == "cycle":
      assert j == d % 3
    elif strategy == "sequence":
      assert j == d // 3
    elif strategy == "middle_cycle":
      assert j == (d - 1) % 2
    else:
      assert j == (d - 1) // 3


def test_indivisible_depth_names_the_nearest_valid_ones():
  with pytest.raises(ValueError, match=r"num_layers=32.*nearest valid depths: 30 or 34"):
    recursion.make_plan("middle_cycle", 32, 4)
  with pytest.raises(ValueError, match=r"nearest valid depths: 9 or 12"):
    recursion.make_plan("cycle", 10, 3)
  with pytest.raises(ValueError, match=r"nearest valid depths: 4$"):
    recursion.make_plan("middle_cycle", 2, 2)
  c = base.get_config()
  c.model.recursion.update(strategy="middle_cycle", num_recursions=4)
  c.model.num_layers = 32
  with pytest.raises(config_lib.ConfigError, match="nearest valid depths"):
    config_lib.validate(c)


def build(**recursion_kw):
  cfg = tiny_config(num_layers=4)
  cfg.model.recursion.update(recursion_kw)
  with nnx.use_eager_sharding(False):
    return cfg, LanguageModel(cfg.model, rngs=nnx.Rngs(0))


def count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_tied_model_stores_one_copy_per_shared_layer():
  cfg, vanilla = build()
  _, tied = build(strategy="cycle", num_recursions=2)
  _, middle = build(strategy="middle_cycle", num_recursions=2)
  layer = (count(vanilla) - cfg.model.vocab_size * cfg.model.d_model - cfg.model.d_model) // 4
  assert count(vanilla) - count(tied) == 2 * layer
  assert count(vanilla) - count(middle) == 1 * layer
  assert len(middle.prelude.blocks) == len(middle.coda.blocks) == 1
  emb = cfg.model.vocab_size * cfg.model.d_model
  assert count(tied) - emb == recursion.non_embedding_params(_with(cfg.model, "cycle", 2))
  assert count(middle) - emb == recursion.non_embedding_params(_with(cfg.model, "middle_cycle", 2))


def _with(m, strategy, nr, **kw):
  m = mlc.ConfigDict(m.to_dict())
  m.recursion.update(dict(strategy=strategy, num_recursions=nr, **kw))
  return m


def test_gradient_of_a_tied_weight_is_the_sum_over_its_depths():
  _, tied = build(strategy="cycle", num_recursions=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)

  def loss(model):
    return jnp.mean(model(tokens)[0] ** 2)

  g_tied = nnx.grad(loss)(tied).core.blocks[0].ffn.up_proj.kernel[...]
  # The same function with the two uses of shared layer 0 given separate (equal) copies.
  _, untied = build()
  for depth, j in enumerate(tied.core.plan.order):
    nnx.update(untied.core.blocks[depth], nnx.state(tied.core.blocks[j]))
  nnx.update(untied.embed, nnx.state(tied.embed))
  nnx.update(untied.norm, nnx.state(tied.norm))
  np.testing.assert_allclose(loss(untied), loss(tied), rtol=1e-6)
  g = nnx.grad(loss)(untied).core.blocks
  np.testing.assert_allclose(g_tied, g[0].ffn.up_proj.kernel[...] + g[2].ffn.up_proj.kernel[...],
                             rtol=1e-5, atol=1e-8)


def test_fresh_lora_equals_the_recursive_model_and_then_relaxes_it():
  _, plain = build(strategy="cycle", num_recursions=2)
  _, relaxed = build(strategy="cycle", num_recursions=2, lora_rank=4)
  nnx.update(relaxed, nnx.state(plain))  # same shared weights; LoRA keeps its B = 0 init
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  np.testing.assert_allclose(relaxed(tokens)[0], plain(tokens)[0], atol=1e-6)
  lora = relaxed.core.lora
  assert lora.up_proj_a.shape == (4, 32, 4) and lora.up_proj_b.shape == (4, 4, 64)
  lora.down_proj_b.set_value(0.1 * jnp.ones_like(lora.down_proj_b[...]))
  assert not np.allclose(relaxed(tokens)[0], plain(tokens)[0], atol=1e-3)


def test_lora_at_one_depth_only_changes_that_depth():
  """Depth 2 reuses shared layer 0: its LoRA must not leak into depth 0."""
  _, m = build(strategy="cycle", num_recursions=2, lora_rank=2)
  tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, 64)
  x = m.embed(tokens)
  idx = jnp.arange(6)[None]
  tok = Tokens(idx, jnp.ones_like(idx), idx)
  before = m.core.blocks[0](x, tok, m.core.lora.at(0))
  b = m.core.lora.q_proj_b
  b.set_value(b[...].at[2].set(1.0))
  np.testing.assert_array_equal(m.core.blocks[0](x, tok, m.core.lora.at(0)), before)
  assert not np.allclose(m.core.blocks[0](x, tok, m.core.lora.at(2)), before)


def test_rank_is_capped_and_per_kind():
  m = _with(tiny_config().model, "cycle", 2, lora_rank=1000, lora_rank_ffn=3, lora_rank_kv=0)
  shapes = recursion.lora_shapes(m)
  assert shapes["q_proj"] == (32, 32, 32)  # min(in, out)
  assert shapes["up_proj"] == (32, 3, 64) and "k_proj" not in shapes


def test_untied_norms_add_one_pair_per_depth():
  cfg, tied = build(strategy="cycle", num_recursions=2)
  _, loose = build(strategy="cycle", num_recursions=2, share_norms=False)
  assert count(loose) - count(tied) == 4 * 2 * cfg.model.d_model


def smollm(name):
  from configs import presets
  c = base.get_config()
  return presets.apply(c, name).model


@pytest.mark.parametrize("nr,layers,want", [(2, 32, 167e6), (3, 32, 118e6), (4, 34, 98e6)])
def test_mor_360m_middle_cycle_param_counts(nr, layers, want):
  m = _with(smollm("360m"), "middle_cycle", nr)
  m.num_layers = layers
  assert recursion.non_embedding_params(m) == pytest.approx(want, abs=0.5e6)


@pytest.mark.parametrize("rank,want", [(64, 1.07e9), (128, 1.15e9), (256, 1.30e9), (512, 1.60e9)])
def test_rrt_gemma_2b_relaxed_param_counts(rank, want):
  gemma = mlc.ConfigDict(base.get_config().model.to_dict())
  gemma.update(d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
               d_ff=16384)
  m = _with(gemma, "cycle", 2, lora_rank=rank)
  assert recursion.non_embedding_params(m) == pytest.approx(want, abs=0.006e9)
