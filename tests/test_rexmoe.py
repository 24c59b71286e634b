"""ReXMoE, experts reused across adjacent layers (docs/moe.md; docs/methods/rrt_coe_rmoe_rexmoe.md
§4): a layer selects a neighbour's expert and uses that very parameter (gradients of both layers
add up in one tensor), r = 1 is the plain MoE, PSR before t_s is the plain MoE with the local
router block (§4.6 check 2), the PSR schedule against Eq. 6 by hand (check 4), groups (check 4),
parameter and FLOP counts (check 5), the step counter and config errors; PSR-Stepwise (Tab. 5),
PSR from N_0 != N and on a plain MoE (R1, the control run).

Tiny shapes: d=32, 4 MoE layers in groups of r=2, 4 experts each of width 16, T=8.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import routing
from research.model import moe, recursion
from research.model.layers import Tokens
from research.model.lm import LanguageModel
from research.train import flops, step
from tests.model_util import tiny_config

E, F, T, R = 4, 16, 8, 2
TOKENS = (jnp.arange(2 * T).reshape(2, T) * 7) % 64


def rex_config(num_layers=4, **moe_keys):
  keys = dict(dict(num_experts=E, top_k=2, d_ff=F, rex_group=R), **moe_keys)
  return tiny_config(num_layers=num_layers, moe=keys)


def build(cfg) -> LanguageModel:
  with nnx.use_eager_sharding(False):
    return LanguageModel(cfg.model, rngs=nnx.Rngs(0))


def count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def model():
  return build(rex_config())


def loop_forward(model, weights):
  """Plain loop over the layers, MoE layer i computing its experts with weights[i] (gate, up,
  down) in place of its group's pool; (LM logits, each layer's routing)."""
  rows = jnp.broadcast_to(jnp.arange(T), (2, T))
  tok = Tokens(rows, jnp.ones_like(TOKENS), rows)
  valid_BT = jnp.ones((2, T), bool)
  x_BTD, routes = model.embed(TOKENS), []
  for block, w in zip(model.core.blocks, weights, strict=True):
    x_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
    u_BTD = block.ffn_norm(x_BTD)
    r = block.ffn.route(u_BTD, valid_BT)
    routes.append(r)
    x_BTD = x_BTD + moe.IMPLS[block.ffn.impl](u_BTD, *w, r)
  return model.logits(x_BTD), routes


def pool_weights(ffn):
  return tuple(p[...] for p in (ffn.pool.gate_proj, ffn.pool.up_proj, ffn.pool.down_proj))


def test_a_layer_uses_its_neighbours_expert_itself(model):
  """Layer 1 routes some tokens to experts of layer 0 (candidates [0, E)); the pool is one object,
  and the model's pool gradient is the sum of what each layer's use contributes."""
  blocks = model.core.blocks
  assert blocks[0].ffn.pool is blocks[1].ffn.pool and blocks[2].ffn.pool is blocks[3].ffn.pool
  assert blocks[1].ffn.pool is not blocks[2].ffn.pool
  graphdef, state = nnx.split(model)
  weights = [pool_weights(block.ffn) for block in blocks]

  def loss_loop(weights):
    logits, routes = loop_forward(nnx.merge(graphdef, state), weights)
    return jnp.sum(logits * jnp.cos(logits)), (logits, routes)

  def loss_model(state):
    logits = nnx.merge(graphdef, state)(TOKENS)[0]
    return jnp.sum(logits * jnp.cos(logits)), logits

  g_layers, (y_loop, routes) = jax.jit(jax.grad(loss_loop, has_aux=True))(weights)
  g_state, y_model = jax.jit(jax.grad(loss_model, has_aux=True))(state)
  np.testing.assert_allclose(y_model, y_loop, atol=1e-5)
  assert bool(jnp.any(routes[1].experts < E)), "layer 1 should pick some of layer 0's experts"
  g_pool = g_state["core"]["blocks"][0]["ffn"]["pool"]
  for i, name in enumerate(("gate_proj", "up_proj", "down_proj")):
    np.testing.assert_allclose(g_pool[name][...], g_layers[0][i] + g_layers[1][i], atol=1e-6)
    used = np.unique(np.asarray(routes[1].experts))
    neighbour = [e for e in used if e < E]
    assert np.abs(np.asarray(g_layers[1][i])[neighbour]).max() > 0


def test_group_of_one_is_the_plain_moe():
  plain = build(tiny_config(num_layers=2, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  r1 = build(rex_config(num_layers=2, rex_group=1))
  flat = lambda m: nnx.to_flat_state(nnx.state(m, nnx.Param))
  for (p1, a), (p2, b) in zip(flat(plain), flat(r1), strict=True):
    assert p1 == p2
    np.testing.assert_array_equal(a[...], b[...])
  np.testing.assert_array_equal(plain(TOKENS)[0], r1(TOKENS)[0])
  assert r1.step_counter is None


def test_psr_before_t_s_is_the_plain_moe_with_the_local_router_block():
  """Spec §4.6 check 2: at step <= t_s only the layer's own experts are routable, so the model
  equals a plain MoE whose layer-l router is W_l's own column block and whose experts are its
  own rows of the pool (softmax + renormalised top-k)."""
  rex = build(rex_config(psr=True, psr_start=3, psr_end=9))
  plain = build(tiny_config(num_layers=4, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  for block_p, block_r in zip(plain.core.blocks, rex.core.blocks, strict=True):
    for name in ("attn_norm", "attn", "ffn_norm"):
      nnx.update(getattr(block_p, name), nnx.state(getattr(block_r, name)))
    ffn_p, ffn_r = block_p.ffn, block_r.ffn
    own = slice(ffn_r.member * E, (ffn_r.member + 1) * E)
    ffn_p.router.w1[...] = ffn_r.router.w1[...][:, :, own]
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(ffn_p, name)[...] = getattr(ffn_r.pool, name)[...][own]
  for name in ("embed", "norm", "head"):
    if getattr(plain, name) is not None:
      nnx.update(getattr(plain, name), nnx.state(getattr(rex, name)))
  for t in (0, 3):
    rex.step_counter[...] = t
    np.testing.assert_allclose(rex(TOKENS)[0], plain(TOKENS)[0], atol=1e-5)
  rex.step_counter[...] = 9  # all 2 E routable: the outputs move
  assert np.abs(np.asarray(rex(TOKENS)[0] - plain(TOKENS)[0])).max() > 1e-4


def eq6(t, n, r, ts, te):
  """Eq. 6 by hand, in exact rationals."""
  if t <= ts:
    return n
  if t > te:
    return r * n
  return math.floor((1 + (r - 1) * (t - ts) / (te - ts)) * n)


def test_psr_schedule_is_eq6():
  steps = [0, 10_000, 10_001, 10_105, 15_000, 20_000, 25_000, 29_999, 30_000, 50_000]
  got = [int(routing.psr_num_candidates(jnp.int32(t), 64, 4, 10_000, 30_000)) for t in steps]
  assert got == [64, 64, 64, 65, 112, 160, 208, 255, 256, 256]  # spec §4.2 reference values
  assert got == [eq6(t, 64, 4, 10_000, 30_000) for t in steps]
  small = [int(routing.psr_num_candidates(jnp.int32(t), E, R, 3, 9)) for t in range(12)]
  assert small == [eq6(t, E, R, 3, 9) for t in range(12)]


def test_psr_mask_at_chosen_steps():
  """The mask keeps N_t candidates, the layer's own first; masked candidates are never chosen."""
  mdl = build(rex_config(psr=True, psr_start=3, psr_end=9))
  ffn = mdl.core.blocks[1].ffn  # member 1: own candidates [E, 2E)
  own = np.arange(R * E) // E == 1
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, 32))
  for t in (0, 3, 5, 7, 9, 20):
    keep = np.asarray(ffn.psr_mask(jnp.int32(t)))
    assert keep.sum() == eq6(t, E, R, 3, 9) and keep[own].all()
    np.testing.assert_array_equal(keep, ffn.psr_mask(jnp.int32(t)))  # reproducible
    r = ffn.route(x_BTD, jnp.ones((2, T), bool), keep_E=jnp.asarray(keep))
    assert keep[np.asarray(r.experts)].all()


def test_the_step_counter_advances_through_the_train_step():
  mdl = build(rex_config(psr=True, psr_start=3, psr_end=9))
  _, aux, _ = mdl(TOKENS)
  assert int(aux["update/step_counter"]) == 1
  _, other = nnx.split(mdl, nnx.Param, ...)[1:]
  other = step.with_updates(other, aux)
  assert int(other["step_counter"][...]) == 1


def test_groups_of_adjacent_moe_layers():
  """Spec §4.6 check 4: r=4 on 8 layers, 0-based layers 0-3 and 4-7 share a pool."""
  mdl = build(rex_config(num_layers=8, rex_group=4))
  ffns = [block.ffn for block in mdl.core.blocks]
  assert [f.member for f in ffns] == [0, 1, 2, 3] * 2
  assert all(f.pool is ffns[0].pool for f in ffns[:4])
  assert all(f.pool is ffns[4].pool for f in ffns[4:]) and ffns[4].pool is not ffns[0].pool
  assert ffns[0].pool.gate_proj.shape == (4 * E, 32, F)


def test_parameter_counts(model):
  """Experts are stored once: the count is the plain MoE's plus the wider routers, d (r - 1) E
  per MoE layer; spec §4.6 check 5: R4 on the 2.3B config adds 32 x 192 x 512 = 3.15M."""
  cfg = rex_config()
  plain = build(tiny_config(num_layers=4, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  assert count(model) - count(plain) == 4 * 32 * (R - 1) * E
  emb = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
  assert count(model) == recursion.non_embedding_params(cfg.model) + emb
  m = tiny_config(moe=dict(num_experts=64, top_k=8)).model
  m.d_model = 512
  m4 = tiny_config(moe=dict(num_experts=64, top_k=8, rex_group=2)).model
  m4.d_model, m4.moe.rex_group = 512, 4
  assert 32 * (moe.router_params(m4) - moe.router_params(m)) == 3_145_728


def test_active_flops_equal_the_plain_moe_but_the_router():
  rex, plain = rex_config().model, tiny_config(num_layers=4, moe=dict(num_experts=E, top_k=2,
                                                                        d_ff=F)).model
  router = 2.0 * 32 * (R - 1) * E
  assert flops.ffn_flops(rex, True) - flops.ffn_flops(plain, True) == router
  assert flops.ffn_flops(rex, True, active=True) - flops.ffn_flops(plain, True,
                                                                    active=True) == router
  assert (flops.paper_flops_per_token(rex, T) - flops.paper_flops_per_token(plain, T)
          == 4 * router)
  dense = rex_config(impl="dense").model  # computes every expert of the pool
  assert flops.ffn_flops(dense, True) == 2.0 * (32 * R * E + 3 * 32 * F * R * E)


@pytest.mark.parametrize("moe_keys, key", [
    (dict(rex_group=0), "model.moe.rex_group"),
    (dict(rex_group=3), "model.moe.rex_group"),
    (dict(psr=True, psr_start=-1), "model.moe.psr_start"),
    (dict(psr=True, psr_start=5, psr_end=5), "model.moe.psr_end"),
    (dict(psr=True, psr_schedule="cubic"), "model.moe.psr_schedule"),
    (dict(psr=True, psr_start_experts=1), "model.moe.psr_start_experts"),  # < top_k
    (dict(psr=True, psr_start_experts=E + 1), "model.moe.psr_start_experts"),
    (dict(psr=True, psr_start_experts=-2), "model.moe.psr_start_experts"),
    (dict(rex_group=1, psr=True), "model.moe.psr"),  # R1 from N: nothing to grow
    (dict(rex_group=1, psr=True, psr_start_experts=E), "model.moe.psr"),
    (dict(rex_group=1, psr=True, psr_start_experts=2, psr_schedule="stepwise"),
     "model.moe.psr_schedule"),
])
def test_config_errors_name_the_key(moe_keys, key):
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{key}=")) as e:
    rex_config(**moe_keys)
  assert "\n" not in str(e.value)  # one `error:` line from the launcher


def test_chain_of_experts_over_the_group_pool():
  """CoE x ReXMoE: iteration t of a layer routes x^(t-1) by its router t over the group's r E
  pooled experts under the layer's PSR mask of the step; the model equals that loop (inner_outer
  wiring), and the counts take C routers of d r E and C expert passes."""
  cfg = rex_config(iterations=2, coe_residual="inner_outer", psr=True, psr_start=0, psr_end=4)
  model = build(cfg)
  model.step_counter[...] = 2
  rows = jnp.broadcast_to(jnp.arange(T), (2, T))
  tok, valid_BT = Tokens(rows, jnp.ones_like(TOKENS), rows), jnp.ones((2, T), bool)
  x_BTD = model.embed(TOKENS)
  for block in model.core.blocks:
    ffn = block.ffn
    assert ffn.router.w1.shape == (2, 32, R * E)
    x_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
    chain_BTD, keep_E = block.ffn_norm(x_BTD), ffn.psr_mask(jnp.int32(2))
    for t in range(2):
      r = ffn.route(chain_BTD, valid_BT, t, keep_E=keep_E)
      assert bool(jnp.all(keep_E[r.experts]))
      chain_BTD = chain_BTD + moe.IMPLS[ffn.impl](chain_BTD, *pool_weights(ffn), r)
    x_BTD = x_BTD + chain_BTD
  np.testing.assert_allclose(model(TOKENS)[0], model.logits(x_BTD), atol=1e-5)
  emb = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
  assert count(model) == recursion.non_embedding_params(cfg.model) + emb
  assert flops.ffn_flops(cfg.model, True) == 2 * flops.ffn_flops(rex_config().model, True)


def test_psr_stepwise_reference_values():
  """Tab. 5 / spec §4.2: N = 64, r = 4, t_s = 10k, t_e = 30k: 64, 128 from 10k, 192 from 20k,
  256 from 30k; r = 2: one jump, at t_s."""
  nt = lambda t, r: int(routing.psr_num_candidates(jnp.int32(t), 64, r, 10_000, 30_000,
                                                  schedule="stepwise"))
  steps = [0, 9_999, 10_000, 15_000, 19_999, 20_000, 29_999, 30_000, 50_000]
  assert [nt(t, 4) for t in steps] == [64, 64, 128, 128, 128, 192, 192, 256, 256]
  assert [nt(t, 2) for t in (0, 9_999, 10_000, 30_000, 50_000)] == [64, 64, 128, 128, 128]
  for group, start, end in ((2, 3, 9), (3, 0, 7), (4, 3, 10), (5, 0, 7), (8, 1, 100)):
    want = np.ceil(np.linspace(start, end, group - 1)).astype(int).tolist()
    assert list(routing.psr_boundaries(group, start, end)) == want
  traced = jax.jit(lambda t: routing.psr_num_candidates(t, 64, 4, 10_000, 30_000,
                                                        schedule="stepwise"))
  assert int(traced(jnp.int32(20_000))) == 192


def test_psr_schedules_from_n0():
  """N_0 != N: linear N_0 + floor((r N - N_0)(t - t_s) / (t_e - t_s)); stepwise N_0 +
  round((r N - N_0) j / (r - 1)); R1 grows N_0 -> N."""
  def nt(t, n, r, n0, schedule="linear"):
    return int(routing.psr_num_candidates(jnp.int32(t), n, r, 10, 30, first=n0,
                                          schedule=schedule))

  steps = [0, 10, 11, 15, 20, 29, 30, 40]
  assert [nt(t, 8, 2, 4) for t in steps] == [4, 4, 4, 7, 10, 15, 16, 16]
  assert [nt(t, 8, 1, 4) for t in steps] == [4, 4, 4, 5, 6, 7, 8, 8]
  assert [nt(t, 8, 2, 8) for t in steps] == [eq6(t, 8, 2, 10, 30) for t in steps]
  assert [nt(t, 8, 4, 4, "stepwise") for t in (0, 10, 20, 30)] == [4, 13, 23, 32]  # 9.33, 18.67
  assert [nt(t, 8, 2, 4, "stepwise") for t in (9, 10)] == [4, 16]


def test_psr_mask_keeps_n_t_own_first_or_a_random_subset_of_own():
  """num_kept >= N: all own and num_kept - N others, the same mask as before N_0 existed (own
  scored -1, the others uniform); num_kept < N: a uniform num_kept-subset of the own experts."""
  n, group, member = 4, 3, 1
  own = np.arange(n * group) // n == member
  subsets = set()
  for seed in range(20):
    key = jax.random.key(seed)
    u = jax.random.uniform(key, (n * group,))
    old = np.asarray(jnp.argsort(jnp.argsort(jnp.where(jnp.asarray(own), -1.0, u)))) < 7
    keep = np.asarray(routing.psr_mask(key, jnp.int32(7), n, member, group))
    np.testing.assert_array_equal(keep, old)
    few = np.asarray(routing.psr_mask(key, jnp.int32(2), n, member, group))
    assert few.sum() == 2 and not few[~own].any()
    subsets.add(tuple(np.flatnonzero(few)))
    r1 = np.asarray(routing.psr_mask(key, jnp.int32(3), 8, 0, 1))
    assert r1.sum() == 3
  assert len(subsets) > 2  # drawn, not the first experts


def r1_psr_config(**keys):
  return rex_config(num_layers=2, **dict(dict(rex_group=1, psr=True, psr_start_experts=2,
                                              psr_start=3, psr_end=9), **keys))


def test_r1_psr_reaches_the_plain_moe_at_t_e_and_masks_before():
  """PSR on a plain MoE from N_0 = 2 to E = 4 over steps 3..9: the step reaches the layers
  through the carry; from t_e every expert is routable and the model is the plain MoE bit for
  bit; before, each layer keeps N_t of its own experts and the outputs differ."""
  r1 = build(r1_psr_config())
  plain = build(tiny_config(num_layers=2, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  flat = lambda m: nnx.to_flat_state(nnx.state(m, nnx.Param))
  for (p1, a), (p2, b) in zip(flat(plain), flat(r1), strict=True):
    assert p1 == p2
    np.testing.assert_array_equal(a[...], b[...])
  assert r1.step_counter is not None
  want = plain(TOKENS)[0]
  for t in (9, 20):
    r1.step_counter[...] = t
    np.testing.assert_array_equal(r1(TOKENS)[0], want)
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, 32))
  masks = []
  for t, kept in ((0, 2), (3, 2), (6, 3), (8, 3)):
    r1.step_counter[...] = t
    assert np.abs(np.asarray(r1(TOKENS)[0] - want)).max() > 1e-5
    for block in r1.core.blocks:
      keep = np.asarray(block.ffn.psr_mask(jnp.int32(t)))
      masks.append(tuple(keep))
      assert keep.shape == (E,) and keep.sum() == kept
      r = block.ffn.route(x_BTD, jnp.ones((2, T), bool), keep_E=jnp.asarray(keep))
      assert keep[np.asarray(r.experts)].all()
  assert len(set(masks)) > 1  # drawn per step and layer
  _, aux, _ = r1(TOKENS)
  other = step.with_updates(nnx.split(r1, nnx.Param, ...)[2], aux)
  assert int(other["step_counter"][...]) == 9  # counter at 8, +1


def test_rexmoe_psr_stepwise_and_from_fewer_than_n_in_the_model():
  """R2 stepwise with t_s = 3, t_e = 9: E candidates before 3, 2 E from 3 (one boundary); R2
  linear from N_0 = 2: a random pair of the layer's own experts at step 0."""
  ffn = build(rex_config(psr=True, psr_start=3, psr_end=9, psr_schedule="stepwise")).core.blocks[1]
  own = np.arange(R * E) // E == 1
  for t, kept in ((0, E), (2, E), (3, 2 * E), (8, 2 * E)):
    keep = np.asarray(ffn.ffn.psr_mask(jnp.int32(t)))
    assert keep.sum() == kept and keep[own].all()
  ffn = build(rex_config(psr=True, psr_start=3, psr_end=9, psr_start_experts=2)).core.blocks[1]
  keep = np.asarray(ffn.ffn.psr_mask(jnp.int32(0)))
  assert keep.sum() == 2 and not keep[~own].any()
  assert np.asarray(ffn.ffn.psr_mask(jnp.int32(9))).all()
