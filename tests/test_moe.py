"""Routed Mixture-of-Experts (docs/moe.md): the ragged path against the dense reference and a plain
Python loop (MaxText's test pattern), hand-computed routing pieces, capacity dropping, the MoE LM
training, the dense default untouched, FLOPs and config errors.

Shapes are tiny (d=32, 4 experts of width 16, T=8); one MoE module per routing config is shared.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import routing
from research.model import moe, recursion
from research.model.layers import Block, Tokens
from research.model.lm import LanguageModel
from research.train import flops
from tests.model_util import (
    assert_decodes_like_forward,
    fit,
    random_batch,
    tiny_config,
    train_setup,
)

E, F, T = 4, 16, 8


def moe_model_config(**moe_keys):
  """tiny_config's model section with 4 experts of width 16 (top-2 unless overridden)."""
  return tiny_config(moe=dict(dict(num_experts=E, top_k=2, d_ff=F), **moe_keys)).model


@functools.cache
def make_moe(**moe_keys) -> moe.MoE:
  with nnx.use_eager_sharding(False):
    return moe.MoE(moe_model_config(**moe_keys), dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0))


def inputs(seed=0):
  """x [2, T, 32]; row 1 ends with 2 padding tokens (valid False)."""
  x_BTD = jax.random.normal(jax.random.key(seed), (2, T, 32))
  valid_BT = jnp.ones((2, T), bool).at[1, T - 2:].set(False)
  return x_BTD, valid_BT


def swiglu_np(x_D, w_gate_DF, w_up_DF, w_down_FD):
  g = x_D @ w_gate_DF
  return ((g / (1 + np.exp(-g))) * (x_D @ w_up_DF)) @ w_down_FD


def loop_reference(layer: moe.MoE, x_BTD, r: moe.Routing) -> np.ndarray:
  """Plain Python loop over tokens and their kept assignments (MaxText MoeLoopBlock)."""
  x = np.asarray(x_BTD, np.float64)
  w_gate, w_up, w_down = (np.asarray(p[...], np.float64)
                          for p in (layer.gate_proj, layer.up_proj, layer.down_proj))
  y = np.zeros_like(x)
  for b, t, i in np.ndindex(*r.experts.shape):
    if r.keep[b, t, i]:
      e = int(r.experts[b, t, i])
      y[b, t] += float(r.weights[b, t, i]) * swiglu_np(x[b, t], w_gate[e], w_up[e], w_down[e])
  return y


CASES = [dict(top_k=1, score="softmax", renormalize=False),
         dict(top_k=2, score="softmax", renormalize=True),
         dict(top_k=2, score="sigmoid", renormalize=True),
         dict(top_k=1, score="softmax", renormalize=False, capacity_factor=1.0),
         dict(top_k=2, score="sigmoid", renormalize=True, capacity_factor=0.5)]


@functools.cache
def forward_and_grads(impl: str, **moe_keys):
  """(y, routing, d<y, probe>/d(x, params)) of the shared module run through `impl`."""
  layer = make_moe(**moe_keys)
  graphdef, state = nnx.split(layer)
  x_BTD, valid_BT = inputs()
  probe_BTD = jax.random.normal(jax.random.key(1), x_BTD.shape)

  @jax.jit
  def run(state, x_BTD):
    def loss(state, x_BTD):
      mdl = nnx.merge(graphdef, state)
      mdl.impl = impl
      y_BTD, _ = mdl(x_BTD, valid_BT)
      return jnp.sum(y_BTD * probe_BTD), (y_BTD, mdl.route(x_BTD, valid_BT))
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(state, x_BTD)

  (g_state, g_x), (y, r) = run(state, x_BTD)
  return y, r, g_x, g_state


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ragged_equals_dense_reference_and_the_loop(case):
  y_ragged, r, gx_ragged, gs_ragged = forward_and_grads("ragged", **case)
  y_dense, _, gx_dense, gs_dense = forward_and_grads("dense", **case)
  x_BTD, _ = inputs()
  np.testing.assert_allclose(y_ragged, loop_reference(make_moe(**case), x_BTD, r), atol=1e-5)
  np.testing.assert_allclose(y_ragged, y_dense, atol=1e-5)
  np.testing.assert_allclose(gx_ragged, gx_dense, atol=1e-5)
  flat_r, flat_d = nnx.to_flat_state(gs_ragged), nnx.to_flat_state(gs_dense)
  for (path, g_r), (_, g_d) in zip(flat_r, flat_d, strict=True):
    np.testing.assert_allclose(g_r[...], g_d[...], atol=1e-5, err_msg=str(path))
  router_grad = dict(nnx.to_flat_state(gs_ragged))[("router", "w1")][...]
  assert np.abs(router_grad).max() > 0  # the router learns through the gates
  if case.get("capacity_factor"):
    assert not bool(jnp.all(r.keep)), "the capacity case should drop something"


def test_combine_by_hand_for_three_tokens():
  """y_t = sum_i w_ti E_{e_ti}(x_t) over kept assignments, hand-written routing."""
  layer = make_moe()
  x_BTD = jax.random.normal(jax.random.key(2), (1, 3, 32))
  r = moe.Routing(logits=jnp.zeros((1, 3, E)),
                  weights=jnp.array([[[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]]]),
                  experts=jnp.array([[[1, 0], [2, 3], [0, 2]]]),
                  keep=jnp.array([[[True, True], [True, False], [True, True]]]))
  w = [np.asarray(p[...]) for p in (layer.gate_proj, layer.up_proj, layer.down_proj)]
  x = np.asarray(x_BTD[0])
  out = [[swiglu_np(x[t], w[0][e], w[1][e], w[2][e]) for e in range(E)] for t in range(3)]
  want = np.stack([0.7 * out[0][1] + 0.3 * out[0][0], out[1][2],
                   0.5 * out[2][0] + 0.5 * out[2][2]])
  for impl in moe.IMPLS.values():
    got = impl(x_BTD, layer.gate_proj[...], layer.up_proj[...], layer.down_proj[...], r)
    np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_top_experts_order_and_renormalisation():
  scores = jnp.array([[[0.1, 0.5, 0.3, 0.1]]])
  w, e = routing.top_experts(scores, 2, renormalize=False)
  np.testing.assert_array_equal(e, [[[1, 2]]])
  np.testing.assert_allclose(w, [[[0.5, 0.3]]])
  w, _ = routing.top_experts(scores, 2, renormalize=True)
  np.testing.assert_allclose(w, [[[0.625, 0.375]]])


def test_balance_loss_is_one_for_a_uniform_router_and_a_hand_value():
  for score in ("softmax", "sigmoid"):
    layer = make_moe(score=score)
    x_BTD, valid_BT = inputs()
    zero = jax.tree.map(jnp.zeros_like, nnx.state(layer, nnx.Param))
    graphdef, state = nnx.split(layer)
    uniform = nnx.merge(graphdef, state)
    nnx.update(uniform.router, zero["router"])
    _, aux = nnx.jit(lambda mdl, x, v: mdl(x, v))(uniform, x_BTD, valid_BT)
    np.testing.assert_allclose(aux["moe/balance"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["loss/moe_balance"], 0.01, rtol=1e-6)
  # 2 valid tokens (a third is padding), E = 3, top-2: f = (1/4, 1/2, 1/4), P = (.4, .4, .2):
  # E sum f P = 3 (0.1 + 0.2 + 0.05) = 1.05.
  probs = jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]]])
  experts = jnp.array([[[0, 1], [1, 2], [2, 2]]])
  valid = jnp.array([[True, True, False]])
  np.testing.assert_allclose(routing.balancing_loss(probs, experts, valid), 1.05, rtol=1e-6)
  np.testing.assert_allclose(routing.load(experts, valid, 3), [0.25, 0.5, 0.25])


def test_z_loss_by_hand_and_in_the_layer():
  # logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4: mean of squares = 2.5 ln(2)^2.
  logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])
  np.testing.assert_allclose(routing.z_loss(logits, jnp.ones((1, 2), bool)),
                             2.5 * np.log(2.0) ** 2, rtol=1e-6)
  layer = make_moe(z_coeff=0.5)
  x_BTD, valid_BT = inputs()
  _, aux = layer(x_BTD, valid_BT)
  s = np.asarray(x_BTD, np.float64) @ np.asarray(layer.router.w1[0], np.float64)
  lse = np.log(np.sum(np.exp(s), axis=-1))
  want = np.sum(lse**2 * np.asarray(valid_BT)) / np.sum(valid_BT)
  np.testing.assert_allclose(aux["moe/z"], want, rtol=1e-5)
  np.testing.assert_allclose(aux["loss/moe_z"], 0.5 * want, rtol=1e-5)


def test_capacity_keeps_the_first_assignments_in_token_order():
  # MaxText's generate_masks example: tokens routed to [0, 1] and [1, 3], capacity 1: the second
  # token's assignment to expert 1 is dropped. Padding takes no slot and is never kept.
  experts = jnp.array([[[0, 1], [1, 3], [1, 2], [2, 0]]])
  valid = jnp.array([[True, True, False, True]])
  keep = routing.within_capacity(experts, valid, 4, 1)
  np.testing.assert_array_equal(keep, [[[1, 1], [0, 1], [0, 0], [1, 0]]])
  assert routing.expert_capacity(T, 2, E, 1.0) == 4  # ceil(8 * 2 / 4) * 1
  assert routing.expert_capacity(T, 2, E, 1.5) == 6
  assert routing.expert_capacity(T, 1, E, 0.1) == 1  # at least one slot


def test_dropped_tokens_add_zero_and_keep_their_residual():
  """capacity 0.25 x ceil(T k / E): one slot per expert; a token whose assignments are all dropped
  gets MoE output 0, so the block leaves it at its post-attention residual."""
  m = moe_model_config(top_k=1, capacity_factor=0.25)
  with nnx.use_eager_sharding(False):
    block = Block(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                  ffn=moe.MoE(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1)))
  x_BTD, _ = inputs()
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  tok = Tokens(idx, jnp.ones((2, T), jnp.int32), idx)

  @nnx.jit
  def run(block, x_BTD, tok):
    out_BTD, aux, _ = block.forward(x_BTD, tok)
    h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
    return out_BTD, aux, h_BTD, block.ffn.route(block.ffn_norm(h_BTD), jnp.ones((2, T), bool))

  out_BTD, aux, h_BTD, r = run(block, x_BTD, tok)
  dropped_BT = ~r.keep[..., 0]
  assert int(dropped_BT.sum()) >= 2 * (T - E)  # at most E tokens per row keep their expert
  np.testing.assert_allclose(out_BTD[dropped_BT], h_BTD[dropped_BT], atol=1e-6)
  assert not np.allclose(out_BTD[~dropped_BT], h_BTD[~dropped_BT])
  np.testing.assert_allclose(aux["moe/dropped"], float(dropped_BT.mean()), rtol=1e-6)


def test_moe_lm_trains_and_reports_aux():
  """Vanilla stack, every layer routed, rematerialised blocks, capacity dropping, z-loss."""
  cfg = tiny_config(remat="block", moe=dict(num_experts=E, top_k=2, d_ff=F, num_shared_experts=1,
                                            capacity_factor=1.25, z_coeff=1e-3))
  cfg.train.lr, cfg.train.warmup_steps = 1e-2, 0
  state, train_step = train_setup(cfg, 12)
  state, metrics, losses = fit(state, train_step, random_batch(), 12)
  assert losses[-1] < 0.7 * losses[0], losses
  assert metrics["moe/load"].shape == (E,)
  np.testing.assert_allclose(metrics["moe/load"].sum(), 1.0, rtol=1e-5)
  assert float(metrics["moe/layers"]) == 2
  assert 0.0 <= float(metrics["moe/dropped"]) < 1.0
  np.testing.assert_allclose(metrics["loss/moe_balance"], 0.01 * metrics["moe/balance"],
                             rtol=1e-5)


def test_aux_is_the_mean_over_moe_layers_and_exits_see_it_too():
  cfg = tiny_config(num_layers=4, recursion=dict(strategy="cycle", num_recursions=2),
                    moe=dict(num_experts=E, top_k=2, d_ff=F, every=2))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(random_batch(2)["tokens"][:, :-1])

  @nnx.jit
  def run(model, tokens):
    _, aux, _ = model(tokens)
    _, exit_aux, _ = model(tokens, exits=True)
    x_BTD, tok = model.core_inputs(tokens)
    per_depth = []  # shared layer 1 (every=2) is the MoE one; it runs at depths 1 and 3
    for depth in range(4):
      block, lora, norms = model.core.at_depth(depth)
      x_BTD, block_aux, _ = block.forward(x_BTD, tok, lora, norms)
      if block_aux:
        per_depth.append(block_aux["moe/balance"])
    return aux, exit_aux, per_depth

  aux, exit_aux, per_depth = run(model, tokens)
  assert len(per_depth) == 2 and float(aux["moe/layers"]) == 2
  np.testing.assert_allclose(aux["moe/balance"], np.mean(per_depth), rtol=1e-5)
  for key in aux:
    np.testing.assert_allclose(exit_aux[key], aux[key], rtol=1e-6)


def test_num_experts_zero_is_the_dense_model():
  """The moe keys are inert at num_experts=0: same parameter tree (SwiGLU FFNs only) and
  bit-identical logits, with no aux."""
  dense = tiny_config()
  other = tiny_config(moe=dict(top_k=1, d_ff=8, every=3, first_dense=1, impl="dense"))
  with nnx.use_eager_sharding(False):
    a, b = (LanguageModel(c.model, rngs=nnx.Rngs(0)) for c in (dense, other))
  flat_a, flat_b = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  assert {p[-2] for p, _ in flat_a if "ffn" in p} == {"gate_proj", "up_proj", "down_proj"}
  for (_, va), (_, vb) in zip(flat_a, flat_b, strict=True):
    np.testing.assert_array_equal(va[...], vb[...])
  tokens = jnp.asarray(random_batch(2)["tokens"][:, :-1])
  (la, aux_a, _), (lb, _, _) = a(tokens), b(tokens)
  np.testing.assert_array_equal(la, lb)
  assert aux_a == {}


def test_dropless_moe_decodes_like_the_full_forward():
  """Prefill then one-token decode steps (research/infer) of a tied core with MoE layers."""
  cfg = tiny_config(vocab_size=64, num_layers=4, recursion=dict(strategy="cycle",
                                                                 num_recursions=2),
                    moe=dict(num_experts=E, top_k=2, d_ff=F, num_shared_experts=1))
  assert_decodes_like_forward(cfg)


def test_flops_count_active_experts_by_hand():
  """d=32, 4 heads of 8 (2 kv), 2 layers, T=16, vocab 64; layer 1 routed (every=2): router 32 x 4,
  top-2 + 1 shared expert of width 16."""
  m = tiny_config(moe=dict(num_experts=4, top_k=2, d_ff=16, num_shared_experts=1, every=2)).model
  attn_proj = 2 * (32 * 32 * 2 + 32 * 16 * 2)
  dense_ffn = 2 * 3 * 32 * 64
  routed_ffn = 2 * (32 * 4 + 3 * 32 * 16 * (2 + 1))
  attention = 2 * 2 * 4 * 8 * 16 / 2
  head = 2 * 32 * 128  # vocab 64 padded to 128
  want = 2 * attn_proj + dense_ffn + routed_ffn + 2 * attention + head
  assert flops.train_flops_per_token(m, 16) == 3 * want
  m.moe.impl = "dense"  # the reference runs all 4 experts
  assert flops.forward_flops_per_token(m, 16) == want + 2 * 3 * 32 * 16 * (4 - 2)
  paper = 2 * (2 * 4 * 32 * 32) + dense_ffn + routed_ffn + 2 * (2 * 32 * 16)
  assert flops.paper_flops_per_token(m, 16) == paper  # active experts, whatever the impl


def test_param_count_includes_every_expert():
  cfg = tiny_config(num_layers=4, recursion=dict(strategy="cycle", num_recursions=2),
                    moe=dict(num_experts=E, d_ff=F, num_shared_experts=1))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  count = sum(v[...].size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  emb = model.embed.embedding.size
  assert count - emb == recursion.non_embedding_params(cfg.model)


@pytest.mark.parametrize("moe_keys,model_keys,needle", [
    (dict(top_k=5), {}, "config.model.moe.top_k=5: must lie in [1, config.model.moe.num_experts"),
    (dict(score="relu"), {}, "config.model.moe.score='relu'"),
    (dict(impl="pallas"), {}, "config.model.moe.impl='pallas'"),
    (dict(capacity_factor=-1.0), {}, "config.model.moe.capacity_factor=-1.0: must be >= 0"),
    (dict(every=0), {}, "config.model.moe.every=0: must be > 0"),
    (dict(d_ff=0), {}, "config.model.moe.d_ff=0"),
    (dict(first_dense=2), {}, "config.model.moe.first_dense=2: with config.model.moe.every=1 no"),
    ({}, dict(num_layers=4, recursion=dict(strategy="cycle", num_recursions=2, lora_rank=2)),
     "config.model.recursion.lora_rank_ffn=-1: a shared MoE layer"),
])
def test_invalid_moe_configs_name_the_key(moe_keys, model_keys, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    tiny_config(moe=dict(dict(num_experts=E), **moe_keys), **model_keys)
  assert needle in str(e.value)
