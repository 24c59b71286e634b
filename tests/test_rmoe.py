"""RMoE, the layerwise recurrent router (docs/moe.md; docs/methods/rrt_coe_rmoe_rexmoe.md §3):
the model against a plain Python loop over layers with a GRU written out gate by gate (values and
gradients, dense and ragged), the carry between layers and across the depths of a tied core, the
detach / stateless (NP) ablations (spec §3.5 checks 2-3), parameter and FLOP counts (§3.2), the
linear default unchanged and config errors; and Table 1's MLP router (SMoE-MLP): its equation,
shapes and gradients, CoE / ReXMoE stacking, a train step, parameter and FLOP counts.

Tiny shapes: d=32, 3 MoE layers, 4 experts of width 16, p=8, MLP width M=12, T=8.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.model import moe, recursion
from research.model.layers import NO_CARRY, Carry, Tokens
from research.model.lm import LanguageModel
from research.train import flops
from tests import model_util
from tests.model_util import assert_decodes_like_forward, tiny_config

E, F, P, T, M = 4, 16, 8, 8, 12
TOKENS = (jnp.arange(2 * T).reshape(2, T) * 7) % 64


def rmoe_config(**model):
  moe_keys = dict(dict(num_experts=E, top_k=2, d_ff=F, router="gru", gru_dim=P),
                  **model.pop("moe", {}))
  return tiny_config(**dict(dict(num_layers=3), moe=moe_keys, **model))


def build(cfg) -> LanguageModel:
  with nnx.use_eager_sharding(False):
    return LanguageModel(cfg.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
  return build(rmoe_config())


def gru_by_hand(cell, x_TP, h_TP):
  """PyTorch nn.GRUCell, gate by gate (spec §3.1)."""
  w_i, w_h = cell.w_i[...], cell.w_h[...]
  b_i, b_h = cell.b_i[...][:, None, None], cell.b_h[...][:, None, None]  # [3, 1, 1, P]
  r = jax.nn.sigmoid(x_TP @ w_i[0] + b_i[0] + h_TP @ w_h[0] + b_h[0])
  z = jax.nn.sigmoid(x_TP @ w_i[1] + b_i[1] + h_TP @ w_h[1] + b_h[1])
  n = jnp.tanh(x_TP @ w_i[2] + b_i[2] + r * (h_TP @ w_h[2] + b_h[2]))
  return (1 - z) * n + z * h_TP


def loop_forward(model, tokens_BT):
  """Plain loop over the layers: attention, then h_i = GRU(x_i Proj_i, h_{i-1}) by hand,
  logits_i = h_i G_i, the MoE with those logits; (LM logits, per-layer router logits)."""
  b, t = tokens_BT.shape
  rows = jnp.broadcast_to(jnp.arange(t), (b, t))
  tok = Tokens(rows, jnp.ones_like(tokens_BT), rows)
  valid_BT = jnp.ones((b, t), bool)
  x_BTD, h_BTP, router_logits = model.embed(tokens_BT), jnp.zeros((b, t, P)), []
  for block in model.core.blocks:
    x_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
    u_BTD, ffn = block.ffn_norm(x_BTD), block.ffn
    h_BTP = gru_by_hand(ffn.router.gru, u_BTD @ ffn.router.proj[...], h_BTP)
    logits_BTE = h_BTP @ ffn.router.gate[...]
    router_logits.append(logits_BTE)
    x_BTD = x_BTD + ffn.routed_experts(u_BTD, ffn.route(u_BTD, valid_BT, logits_BTE=logits_BTE))
  return model.logits(x_BTD), router_logits


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_rmoe_equals_a_loop_over_layers_with_a_gru_by_hand(model, impl):
  graphdef, state = nnx.split(model)

  def run(forward):
    def loss(state):
      mdl = nnx.merge(graphdef, state)
      for block in mdl.core.blocks:
        block.ffn.impl = impl
      logits = forward(mdl)
      return jnp.sum(logits * jnp.cos(logits)), logits
    return jax.jit(jax.grad(loss, has_aux=True))(state)

  g_model, y_model = run(lambda mdl: mdl(TOKENS)[0])
  g_loop, y_loop = run(lambda mdl: loop_forward(mdl, TOKENS)[0])
  np.testing.assert_allclose(y_model, y_loop, atol=1e-5)
  flat_loop = dict(nnx.to_flat_state(g_loop))
  for path, g in nnx.to_flat_state(g_model):
    np.testing.assert_allclose(g[...], flat_loop[path][...], atol=1e-5, err_msg=str(path))
  gru_grad = flat_loop[("core", "blocks", 0, "ffn", "router", "gru", "w_h")][...]
  assert np.abs(gru_grad).max() > 0  # the one GRU cell learns from all layers


def test_one_gru_cell_shared_proj_and_gate_per_layer(model):
  cells = [block.ffn.router.gru for block in model.core.blocks]
  assert all(cell is cells[0] for cell in cells)
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert sum("gru/w_i" in p for p in paths) == 1  # stored once
  assert sum(p.endswith("router/proj") for p in paths) == 3
  _, router_logits = loop_forward(model, TOKENS)
  assert [r.shape for r in router_logits] == [(2, T, E)] * 3


def layer_logits(layer: moe.MoE, u_BTD, carry: Carry):
  """(router logits, carry out) of one MoE layer on input u with the given carry."""
  _, _, out = layer.forward(u_BTD, None, carry)
  return layer.router(u_BTD, carry.router)[0], out


@pytest.mark.parametrize("recurrence", ["full", "detach", "none"])
def test_the_carry_reaches_the_next_layer(recurrence):
  """Changing layer 0's router input changes layer 1's routing (full, detach) through h_0 only;
  detach keeps the forward and drops layer 0's router gradient from layer 1's logits (spec §3.5
  check 3); none (NP) is stateless."""
  mdl = build(rmoe_config(moe=dict(gru_recurrence=recurrence)))
  first, second = mdl.core.blocks[0].ffn, mdl.core.blocks[1].ffn
  u0, u0_other, u1 = (jax.random.normal(jax.random.key(i), (2, T, 32)) for i in range(3))

  graphdef, state = nnx.split(first)

  def second_logits(state, u0):
    _, carry = layer_logits(nnx.merge(graphdef, state), u0, NO_CARRY)
    return layer_logits(second, u1, carry)[0]

  a, b = second_logits(state, u0), second_logits(state, u0_other)
  grads = jax.grad(lambda s: jnp.sum(second_logits(s, u0) ** 2))(state)
  grad = grads["router"]["proj"][...]
  if recurrence == "none":
    np.testing.assert_array_equal(a, b)
  else:
    assert np.abs(a - b).max() > 1e-4
    full = build(rmoe_config())  # the same weights: detach changes no forward value
    np.testing.assert_allclose(mdl(TOKENS)[0], full(TOKENS)[0], atol=1e-6)
  assert (np.abs(grad).max() > 0) == (recurrence == "full")


def test_np_router_is_a_two_layer_mlp_with_the_same_parameters():
  """Spec §3.5 check 2: with h_{i-1} = 0 the router is G(GRU(x Proj, 0)); parameter counts equal."""
  full, np_model = build(rmoe_config()), build(rmoe_config(moe=dict(gru_recurrence="none")))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(full) == count(np_model)
  layer = np_model.core.blocks[2].ffn
  u = jax.random.normal(jax.random.key(0), (2, T, 32))
  by_hand = gru_by_hand(layer.router.gru, u @ layer.router.proj[...], jnp.zeros((2, T, P)))
  some_state = jnp.ones((2, T, P))
  np.testing.assert_allclose(layer.router(u, some_state)[0], by_hand @ layer.router.gate[...],
                             atol=1e-6)


def test_the_state_continues_across_the_depths_of_a_tied_core():
  """A tied MoE layer run at two depths reads, at depth 2, the state it left at depth 1."""
  cfg = rmoe_config(num_layers=2, recursion=dict(strategy="cycle", num_recursions=2))
  mdl = build(cfg)
  x_BTD, tok = mdl.core_inputs(TOKENS)
  out, _, carry = mdl.core.forward(x_BTD, tok)
  assert carry.router.shape == (2, T, P)
  x_chain, x_reset, c = x_BTD, x_BTD, NO_CARRY
  for depth in range(2):
    block, lora, norms = mdl.core.at_depth(depth)
    x_chain, _, c = block.forward(x_chain, tok, lora, norms, carry=c)
    x_reset, _, _ = block.forward(x_reset, tok, lora, norms)
  np.testing.assert_allclose(out, x_chain, atol=1e-6)
  assert np.abs(np.asarray(out - x_reset)).max() > 1e-5


def test_linear_router_is_bit_identical_to_main():
  """Logits of a tiny linear-router MoE model recorded on main (7dbe6cd) before the carry; the
  parameter trees, logits and gradients of three configs were also compared bit for bit."""
  cfg = tiny_config(num_layers=3, moe=dict(num_experts=4, top_k=2, d_ff=16, num_shared_experts=1))
  logits, aux, _ = build(cfg)(TOKENS)
  main = [0.5307830572128296, -0.013621663674712181, 0.03294314071536064,
          -0.028920769691467285, 0.17886482179164886, -0.030144361779093742]
  # rtol 1e-5: the CPU flash attention (xla_attention.flash_attention) rounds differently from
  # the einsum path these logits were recorded with (observed: rel 1.4e-6)
  np.testing.assert_allclose(np.asarray(logits[:, :, :3]).reshape(-1)[:6], main, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(logits)), 20.423290252685547, rtol=1e-5)
  np.testing.assert_allclose(float(aux["moe/balance"]), 1.0093896389007568, rtol=1e-6)


def test_parameter_counts(model):
  """The model's parameters = recursion.non_embedding_params + embedding; the paper's router
  counts (spec §3.2): enwik8 0.045M -> 0.476M, 0.91B model + 3.59M."""
  cfg = rmoe_config()
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  emb = cfg.model.vocab_size * cfg.model.d_model
  assert n == recursion.non_embedding_params(cfg.model) + emb * (1 if cfg.model.tie_embeddings
                                                                  else 2)
  linear = build(tiny_config(num_layers=3, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  n_linear = sum(x.size for x in jax.tree.leaves(nnx.state(linear, nnx.Param)))
  assert n - n_linear == 3 * (32 * P + P * E - 32 * E) + 6 * P * P + 6 * P

  def routers_of(d, layers, p, router):
    m = tiny_config(moe=dict(num_experts=16, router=router, gru_dim=p)).model
    m.d_model = d
    return layers * moe.router_params(m) + moe.shared_router_params(m)

  assert routers_of(352, 8, 128, "linear") == 45_056
  assert routers_of(352, 8, 128, "gru") == 475_904
  assert routers_of(1280, 24, 128, "gru") - routers_of(1280, 24, 128, "linear") == 3_588_864


def test_flops_count_the_gru_router():
  m = rmoe_config().model
  linear = tiny_config(num_layers=3, moe=dict(num_experts=E, top_k=2, d_ff=F)).model
  extra = 2.0 * (32 * P + 6 * P * P + P * E - 32 * E)
  assert flops.ffn_flops(m, True) - flops.ffn_flops(linear, True) == extra
  assert flops.ffn_flops(m, True, active=True) - flops.ffn_flops(linear, True, active=True) == extra
  diff = flops.forward_flops_per_token(m, T) - flops.forward_flops_per_token(linear, T)
  assert diff == 3 * extra
  assert (flops.paper_flops_per_token(m, T) - flops.paper_flops_per_token(linear, T)) == 3 * extra


def test_the_recurrent_router_decodes_like_the_full_forward():
  """The carry (h of the previous MoE layer) flows through the decode forward as in training."""
  assert_decodes_like_forward(rmoe_config())


@pytest.mark.parametrize("moe_keys, key", [
    (dict(router="lstm"), "model.moe.router"),
    (dict(router="gru", gru_dim=0), "model.moe.gru_dim"),
    (dict(router="gru", gru_recurrence="truncated"), "model.moe.gru_recurrence"),
    (dict(router="mlp", router_mlp_dim=0), "model.moe.router_mlp_dim"),
    (dict(router="mlp", router_mlp_dim=-2), "model.moe.router_mlp_dim"),
    (dict(router="mlp", gru_dim=0), "model.moe.gru_dim"),  # the default width 2 p
])
def test_config_errors_name_the_key(moe_keys, key):
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{key}=")) as e:
    tiny_config(moe=dict(dict(num_experts=E, top_k=2), **moe_keys))
  assert "\n" not in str(e.value)  # one `error:` line from the launcher


def test_chain_of_experts_with_the_recurrent_router_is_refused():
  """CoE iterations with RMoE's GRU router are not implemented: validation names both keys."""
  with pytest.raises(config_lib.ConfigError, match=r"model\.moe\.router.*model\.moe\.iterations"):
    tiny_config(moe=dict(num_experts=E, top_k=2, router="gru", iterations=2))


def mlp_config(**moe_keys):
  keys = dict(dict(num_experts=E, top_k=2, d_ff=F, router="mlp", router_mlp_dim=M), **moe_keys)
  return tiny_config(num_layers=3, moe=keys)


def test_mlp_router_is_gelu_of_x_w1_times_w2_with_its_shapes_and_gradients():
  """logits = GELU(x W1) W2 in float32, W1 [D, M], W2 [M, E] per MoE layer, no biases; every
  router weight gets a gradient through the model's loss."""
  mdl = build(mlp_config())
  router = mdl.core.blocks[1].ffn.router
  assert router.w1.shape == (1, 32, M) and router.w2.shape == (1, M, E)
  x_BTD = jax.random.normal(jax.random.key(0), (2, T, 32)).astype(jnp.bfloat16)
  logits_BTE = router(x_BTD, 0)
  x32 = x_BTD.astype(jnp.float32)
  by_hand = jax.nn.gelu(x32 @ router.w1[...][0], approximate=False) @ router.w2[...][0]
  assert logits_BTE.dtype == jnp.float32 and logits_BTE.shape == (2, T, E)
  np.testing.assert_allclose(logits_BTE, by_hand, atol=1e-6)
  graphdef, state = nnx.split(mdl)
  grads = jax.grad(lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(TOKENS)[0])))(state)
  for block in grads["core"]["blocks"].values():
    w1, w2 = block["ffn"]["router"]["w1"][...], block["ffn"]["router"]["w2"][...]
    assert w1.shape == (1, 32, M) and w2.shape == (1, M, E)
    assert np.abs(w1).max() > 0 and np.abs(w2).max() > 0
  default = build(mlp_config(router_mlp_dim=-1, gru_dim=5))  # -1: 2 gru_dim
  assert default.core.blocks[0].ffn.router.w1.shape == (1, 32, 10)


def test_mlp_router_stacks_per_coe_iteration_and_scores_a_rexmoe_group():
  coe = build(mlp_config(iterations=2, coe_residual="inner_outer")).core.blocks[0].ffn.router
  assert coe.w1.shape == (2, 32, M) and coe.w2.shape == (2, M, E)
  shared = build(mlp_config(iterations=2, coe_shared_router=True)).core.blocks[0].ffn.router
  assert shared.w1.shape == (1, 32, M)
  rex = build(tiny_config(num_layers=2, moe=dict(num_experts=E, top_k=2, d_ff=F, router="mlp",
                                                 router_mlp_dim=M, rex_group=2)))
  assert rex.core.blocks[1].ffn.router.w2.shape == (1, M, 2 * E)
  for cfg in (mlp_config(iterations=2), mlp_config(iterations=2, coe_shared_router=True)):
    mdl = build(cfg)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(mdl, nnx.Param)))
    emb = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
    assert n == recursion.non_embedding_params(cfg.model) + emb


def test_moe_with_the_mlp_router_trains_a_step():
  cfg = mlp_config()
  state, train_step = model_util.train_setup(cfg, 2)
  before = state["params"]["core"]["blocks"][0]["ffn"]["router"]["w1"][...]
  state, _, losses = model_util.fit(state, train_step, model_util.random_batch(), 2)
  assert all(np.isfinite(losses)) and int(state["step"]) == 2
  after = state["params"]["core"]["blocks"][0]["ffn"]["router"]["w1"][...]
  assert np.abs(np.asarray(after - before)).max() > 0


def test_mlp_router_parameter_and_flop_counts():
  """d M + M E per MoE layer instead of d E; the paper's enwik8 SMoE-MLP (8 layers, h 352, E 16)
  has 0.75M router parameters, which m = 2 p = 256 gives: 8 (352 256 + 256 16) = 753,664."""
  cfg = mlp_config()
  mdl = build(cfg)
  linear = build(tiny_config(num_layers=3, moe=dict(num_experts=E, top_k=2, d_ff=F)))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(mdl) - count(linear) == 3 * (32 * M + M * E - 32 * E)
  m = tiny_config(moe=dict(num_experts=16, router="mlp", gru_dim=128)).model
  m.d_model = 352
  assert 8 * moe.router_params(m) + moe.shared_router_params(m) == 753_664
  m.moe.router_mlp_dim = 100
  assert moe.router_params(m) == 352 * 100 + 100 * 16
  lin_m = tiny_config(num_layers=3, moe=dict(num_experts=E, top_k=2, d_ff=F)).model
  extra = 2.0 * (32 * M + M * E - 32 * E)
  assert flops.ffn_flops(cfg.model, True) - flops.ffn_flops(lin_m, True) == extra
  diff = flops.paper_flops_per_token(cfg.model, T) - flops.paper_flops_per_token(lin_m, T)
  assert diff == 3 * extra
  coe = mlp_config(iterations=2).model
  assert moe.router_params(coe) == 2 * (32 * M + M * E)
