"""Chain-of-Experts (docs/moe.md, docs/methods/rrt_coe_rmoe_rexmoe.md §2): C iterations of the
routed FFN over the same experts with per-iteration routers, against a by-hand Python loop (values
and gradients, dense and ragged), the residual wirings of the official code, per-iteration routing,
the aux loss as a sum over gate calls, the spec's tiny CPU checks (§2.5: 1-5), FLOPs, parameters,
the configs/moe.py:<preset>,coe preset and config errors.

Shapes are tiny (d=32, 4 routed experts of width 16 + 1 shared, T=8, C=2); one module per routing
config is built once per module (`layers` fixture).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_config
from research import config as config_lib
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

E, F, T, D = 4, 16, 8, 32
COE = dict(num_experts=E, top_k=2, d_ff=F, num_shared_experts=1, iterations=2,
           coe_residual="inner", renormalize=False)  # the CoE code's DeepSeek gate, C=2


def coe_model_config(**moe_keys):
  return tiny_config(moe=dict(COE, **moe_keys)).model


@pytest.fixture(scope="module")
def layers():
  """layers(**moe_keys): the MoE module of COE updated by moe_keys, built once per module, its
  routers redrawn at std 0.3 (init: 0.02) so that the top-k choices have clear margins."""
  built = {}

  def make(**moe_keys) -> moe.MoE:
    key = tuple(sorted(moe_keys.items()))
    if key not in built:
      with nnx.use_eager_sharding(False):
        layer = moe.MoE(coe_model_config(**moe_keys), dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0))
      w1 = layer.router.w1
      w1[...] = 0.3 * jax.random.normal(jax.random.key(3), w1.shape)
      built[key] = layer
    return built[key]

  return make


def inputs(seed=0):
  """x [2, T, D]; row 1 ends with 2 padding tokens (valid False)."""
  x_BTD = jax.random.normal(jax.random.key(seed), (2, T, D))
  valid_BT = jnp.ones((2, T), bool).at[1, T - 2:].set(False)
  return x_BTD, valid_BT


def with_impl(layer: moe.MoE, impl: str) -> moe.MoE:
  """A copy of `layer` (same parameters) run through `impl`."""
  copy = nnx.clone(layer)
  copy.impl = impl
  return copy


@nnx.jit
def forward(layer: moe.MoE, x_BTD, valid_BT):
  """((y, aux), (x^(C), routings)) of `layer`, jitted."""
  return layer(x_BTD, valid_BT), layer.iterate(x_BTD, valid_BT)


def swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def reference(p: dict, x_BTD, *, iterations: int, top_k: int, inner: bool, shared_router: bool):
  """By hand: a Python loop over the C iterations and the E experts (spec §2.1): DeepSeek gate
  (float32 softmax over E, top-k, no renormalisation), the shared expert at every iteration, the
  inner residual if `inner`. p maps parameter paths to arrays. Returns x^(C) and the smallest gap
  between a chosen and an unchosen probability (a near-tie could route the module differently)."""
  shared = [p[("shared", name, "kernel")] for name in ("gate_proj", "up_proj", "down_proj")]
  gap = jnp.inf
  for t in range(iterations):
    probs_BTE = jax.nn.softmax(x_BTD @ p[("router", "w1")][0 if shared_router else t], axis=-1)
    top_w_BTK, top_e_BTK = jax.lax.top_k(probs_BTE, top_k)
    ranked_BTE = jax.lax.stop_gradient(jax.lax.top_k(probs_BTE, E)[0])
    gap = jnp.minimum(gap, jnp.min(ranked_BTE[..., top_k - 1] - ranked_BTE[..., top_k]))
    y_BTD = swiglu(x_BTD, *shared)
    for e in range(E):
      gate_BT = jnp.sum(jnp.where(top_e_BTK == e, top_w_BTK, 0.0), axis=-1)
      y_BTD = y_BTD + gate_BT[..., None] * swiglu(x_BTD, p[("gate_proj",)][e],
                                                    p[("up_proj",)][e], p[("down_proj",)][e])
    x_BTD = x_BTD + y_BTD if inner else y_BTD
  return x_BTD, gap


def flat_params(layer: moe.MoE) -> dict:
  return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def module_value_and_grads(layer: moe.MoE, impl: str, x_BTD, valid_BT, probe_BTD):
  """(y, d<y, probe>/d params as a flat dict, d<y, probe>/dx) of `layer` run through `impl`."""
  graphdef, params, rest = nnx.split(with_impl(layer, impl), nnx.Param, ...)

  @jax.jit
  def run(params, x_BTD):
    def loss(params, x_BTD):
      y_BTD, _ = nnx.merge(graphdef, params, rest)(x_BTD, valid_BT)
      return jnp.sum(y_BTD * probe_BTD), y_BTD
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x_BTD)

  (g_params, g_x), y = run(params, x_BTD)
  return y, {path: v[...] for path, v in nnx.to_flat_state(g_params)}, g_x


CASES = [dict(), dict(coe_residual="outer"),
         dict(coe_shared_router=True, top_k=1, coe_residual="inner_outer")]


@pytest.mark.parametrize("impl", ["dense", "ragged"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
                         or "default")
def test_module_equals_the_python_loop_values_and_gradients(layers, impl, case):
  layer = layers(**case)
  x_BTD, valid_BT = inputs()
  probe_BTD = jax.random.normal(jax.random.key(1), x_BTD.shape)
  kw = dict(iterations=2, top_k=layer.top_k, inner=layer.inner_residual,
            shared_router=layer.shared_router)
  p = flat_params(layer)

  def ref_loss(p, x_BTD):
    y_BTD, gap = reference(p, x_BTD, **kw)
    return jnp.sum(y_BTD * probe_BTD), (y_BTD, gap)

  ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1), has_aux=True))
  (g_ref, gx_ref), (y_ref, gap) = ref_grads(p, x_BTD)
  assert gap > 1e-5, "near-tie in the routing: pick another input seed"  # fp32 both sides
  y, g, gx = module_value_and_grads(layer, impl, x_BTD, valid_BT, probe_BTD)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, atol=2e-5, rtol=1e-5)
  assert g.keys() == g_ref.keys()
  for path in g:
    np.testing.assert_allclose(g[path], g_ref[path], atol=5e-5, rtol=1e-5, err_msg=str(path))
  router_grad = g[("router", "w1")]
  assert router_grad.shape[0] == (1 if case.get("coe_shared_router") else 2)
  assert all(np.abs(router_grad[i]).max() > 0 for i in range(router_grad.shape[0]))


def test_dense_and_ragged_agree_with_capacity_dropping(layers):
  layer = layers(capacity_factor=0.5)
  x_BTD, valid_BT = inputs()
  (y_d, aux_d), (y_r, aux_r) = (nnx.jit(lambda m, x, v: m(x, v))(with_impl(layer, impl),
                                                                 x_BTD, valid_BT)
                                for impl in ("dense", "ragged"))
  np.testing.assert_allclose(y_d, y_r, atol=2e-5)
  for key in aux_d:
    np.testing.assert_allclose(aux_d[key], aux_r[key], rtol=1e-5, err_msg=key)
  assert float(aux_d["moe/dropped"]) > 0


def test_one_iteration_is_the_plain_moe_bit_for_bit(layers):
  """C=1 with the default residual: the module is route -> routed_experts + shared (the MoE's
  single pass), same aux; the block is h + MoE(norm(h))."""
  layer = layers(iterations=1, coe_residual="outer")
  assert layer.router.w1.shape == (1, D, E) and layer.outer_residual
  x_BTD, valid_BT = inputs()

  @nnx.jit
  def run(layer, x_BTD, valid_BT):
    r = layer.route(x_BTD, valid_BT)
    y_BTD = layer.routed_experts(x_BTD, r) + layer.shared(x_BTD)
    return layer(x_BTD, valid_BT), (y_BTD, layer.aux(r, valid_BT))

  (y, aux), (y_plain, aux_plain) = run(layer, x_BTD, valid_BT)
  np.testing.assert_array_equal(y, y_plain)
  assert aux.keys() == aux_plain.keys()
  for key in aux:
    np.testing.assert_array_equal(aux[key], aux_plain[key], err_msg=key)


def make_block(**moe_keys) -> Block:
  m = coe_model_config(**moe_keys)
  with nnx.use_eager_sharding(False):
    return Block(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                 ffn=moe.MoE(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("iterations,residual", [(1, "outer"), (1, "inner"), (2, "inner"),
                                                 (2, "inner_outer"), (2, "outer")])
def test_block_residual_wiring_of_the_official_layer(iterations, residual):
  """CoeDecoderLayer (spec §2.1): h = x + attn(norm1(x)), x0 = norm2(h), x^(t) = [x^(t-1) +]
  MoE_t(x^(t-1)), out = x^(C) [+ h]. C=1 inner is spec §2.5 check 1: norm(h) + MoE(norm(h))."""
  block = make_block(iterations=iterations, coe_residual=residual)
  x_BTD, _ = inputs()
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  tok = Tokens(idx, jnp.ones((2, T), jnp.int32), idx)

  @nnx.jit
  def run(block, x_BTD):
    h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
    x0_BTD = block.ffn_norm(h_BTD)
    chain_BTD = x0_BTD
    for t in range(iterations):
      u_BTD = block.ffn.routed_experts(chain_BTD, block.ffn.route(chain_BTD, idx >= 0, t))
      u_BTD = u_BTD + block.ffn.shared(chain_BTD)
      chain_BTD = chain_BTD + u_BTD if residual != "outer" else u_BTD
    return block(x_BTD, tok), chain_BTD + h_BTD if residual != "inner" else chain_BTD

  out_BTD, want_BTD = run(block, x_BTD)
  np.testing.assert_allclose(out_BTD, want_BTD, atol=1e-5)


def test_shared_expert_runs_at_every_iteration(layers):
  """Spec §2.5 check 2: routed experts zeroed (down = 0), M=1, C=2, inner residual:
  y = x0 + S(x0) + S(x0 + S(x0)), i.e. S is evaluated twice per token."""
  layer = with_impl(layers(), "dense")
  layer.down_proj[...] = jnp.zeros_like(layer.down_proj[...])
  x_BTD, valid_BT = inputs()
  (y_BTD, _), _ = forward(layer, x_BTD, valid_BT)
  w = [np.asarray(getattr(layer.shared, n).kernel[...], np.float64)
       for n in ("gate_proj", "up_proj", "down_proj")]

  def s(x):
    g = x @ w[0]
    return ((g / (1 + np.exp(-g))) * (x @ w[1])) @ w[2]

  x = np.asarray(x_BTD, np.float64)
  np.testing.assert_allclose(y_BTD, x + s(x) + s(x + s(x)), atol=1e-5)


def test_changing_router_two_changes_only_the_second_routing(layers):
  layer = layers()
  x_BTD, valid_BT = inputs()
  w1 = np.asarray(layer.router.w1[...])
  assert w1.shape == (2, D, E) and not np.allclose(w1[0], w1[1])  # independent init
  (_, (y, rs)), (_, (y2, rs2)) = (forward(m, x_BTD, valid_BT)
                                  for m in (layer, with_router(layer, 1, seed=5)))
  for field in ("logits", "weights", "experts"):
    np.testing.assert_array_equal(getattr(rs[0], field), getattr(rs2[0], field))
  assert not np.array_equal(rs[1].experts, rs2[1].experts)
  assert not np.allclose(y, y2)
  _, (_, rs3) = forward(with_router(layer, 0, seed=5), x_BTD, valid_BT)
  assert not np.array_equal(rs[0].experts, rs3[0].experts)


def with_router(layer: moe.MoE, i: int, seed: int) -> moe.MoE:
  """A copy of `layer` whose router i is redrawn."""
  copy = nnx.clone(layer)
  w1 = copy.router.w1[...]
  copy.router.w1[...] = w1.at[i].set(0.3 * jax.random.normal(jax.random.key(seed), w1[i].shape))
  return copy


@pytest.mark.parametrize("shared_router", [False, True])
def test_iteration_two_routes_the_first_output(layers, shared_router):
  """Router t sees x^(t-1): iteration 2's logits are x^(1) W_2, with x^(1) = x + MoE_1(x). With
  coe_shared_router (the code's use_igate=False, spec §2.5 check 3) W_2 = W_1, one [1, D, E]
  router, yet the tokens are re-routed on the new x."""
  layer = layers(coe_shared_router=shared_router) if shared_router else layers()
  x_BTD, valid_BT = inputs()
  first = nnx.clone(layer)
  first.iterations = 1
  _, (x1_BTD, _) = forward(first, x_BTD, valid_BT)
  _, (_, rs) = forward(layer, x_BTD, valid_BT)
  w1 = np.asarray(layer.router.w1[...], np.float64)
  assert w1.shape[0] == (1 if shared_router else 2)
  np.testing.assert_allclose(rs[1].logits, np.asarray(x1_BTD, np.float64) @ w1[-1],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(rs[0].logits, np.asarray(x_BTD, np.float64) @ w1[0], atol=1e-5,
                             rtol=1e-5)
  assert np.abs(np.asarray(rs[1].logits) - np.asarray(rs[0].logits)).max() > 1e-3  # re-routed


def hand_balance(logits_BTE, experts_BTK, valid_BT, scope: str) -> float:
  """E sum_e f_e P_e over the valid tokens of the batch, or per row then averaged (DeepSeek
  seq_aux: ce_be = count_be / (T_b K / E))."""
  p = np.exp(logits_BTE - logits_BTE.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  rows = [list(range(len(valid_BT)))] if scope == "batch" else [[b] for b in range(len(valid_BT))]
  k = experts_BTK.shape[-1]
  out = []
  for row in rows:
    tokens = [(b, t) for b in row for t in range(valid_BT.shape[1]) if valid_BT[b, t]]
    count = np.zeros(E)
    for b, t in tokens:
      for e in experts_BTK[b, t]:
        count[e] += 1
    mean_p = np.mean([p[b, t] for b, t in tokens], axis=0)
    out.append(E * np.sum(count / (len(tokens) * k) * mean_p))
  return float(np.mean(out))


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_aux_loss_is_the_sum_over_gate_calls(layers, scope):
  layer = layers(balance_scope=scope, z_coeff=0.1)
  x_BTD, valid_BT = inputs()
  (_, aux), (_, rs) = forward(layer, x_BTD, valid_BT)
  valid = np.asarray(valid_BT)
  per_call = [hand_balance(np.asarray(r.logits, np.float64), np.asarray(r.experts), valid, scope)
              for r in rs]
  z = [np.sum(np.log(np.sum(np.exp(np.asarray(r.logits, np.float64)), -1)) ** 2 * valid)
       / valid.sum() for r in rs]
  np.testing.assert_allclose(aux["loss/moe_balance"], 0.01 * sum(per_call), rtol=1e-5)
  np.testing.assert_allclose(aux["loss/moe_z"], 0.1 * sum(z), rtol=1e-5)
  np.testing.assert_allclose(aux["moe/balance"], np.mean(per_call), rtol=1e-5)  # statistics:
  loads = [np.mean(np.asarray(jax.nn.one_hot(r.experts, E)), axis=2)[valid].mean(0) for r in rs]
  np.testing.assert_allclose(aux["moe/load"], np.mean(loads, axis=0), rtol=1e-5)  # means
  assert float(aux["moe/layers"]) == 1


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_balanced_routing_gives_coeff_per_gate_call_in_the_model(scope):
  """Spec §2.5 check 4: uniform router probabilities (zero routers) make every gate call's
  balance loss exactly 1; a layer sums its C = 2 gate calls, the model averages its 2 layers, so
  loss/moe_balance = C x coeff (the official total, summed over layers too, is L C alpha)."""
  cfg = tiny_config(moe=dict(COE, balance_scope=scope, balance_coeff=0.001))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  for block in model.core.blocks:
    block.ffn.router.w1[...] = jnp.zeros_like(block.ffn.router.w1[...])
  segments = jnp.ones((2, T), jnp.int32).at[1, T - 3:].set(0)
  _, aux, _ = nnx.jit(lambda m, t, s: m(t, segments_BT=s))(model, jnp.zeros((2, T), jnp.int32),
                                                          segments)
  np.testing.assert_allclose(aux["moe/balance"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux["loss/moe_balance"], 2 * 0.001, rtol=1e-6)
  assert float(aux["moe/layers"]) == 2


def test_flops_count_c_iterations_by_hand():
  """d=32, 4 heads of 8 (2 kv), 2 layers both routed, T=16, vocab 64 -> 128; per iteration a
  router 32 x 4 and top-2 + 1 shared expert of width 16; C=2."""
  m = coe_model_config()
  attn_proj = 2 * (32 * 32 * 2 + 32 * 16 * 2)
  routed_ffn = 2 * 2 * (32 * 4 + 3 * 32 * 16 * (2 + 1))
  attention = 2 * 2 * 4 * 8 * 16 / 2
  head = 2 * 32 * 128
  want = 2 * (attn_proj + routed_ffn + attention) + head
  assert flops.train_flops_per_token(m, 16) == 3 * want
  assert flops.paper_flops_per_token(m, 16) == 2 * (2 * 4 * 32 * 32 + routed_ffn + 2 * 32 * 16)
  m.moe.impl = "dense"  # all 4 experts at each of the 2 iterations of the 2 layers
  assert flops.forward_flops_per_token(m, 16) == want + 2 * 2 * 2 * 3 * 32 * 16 * (4 - 2)
  m.moe.impl, m.moe.coe_shared_router = "ragged", True  # one router, still called C times
  assert flops.forward_flops_per_token(m, 16) == want


@pytest.mark.parametrize("shared_router", [False, True])
def test_param_count_has_a_router_per_iteration(shared_router):
  cfg = tiny_config(num_layers=4, recursion=dict(strategy="cycle", num_recursions=2),
                    moe=dict(COE, coe_shared_router=shared_router))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  count = sum(v[...].size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert count - model.embed.embedding.size == recursion.non_embedding_params(cfg.model)
  plain = tiny_config(num_layers=4, recursion=dict(strategy="cycle", num_recursions=2),
                      moe=dict(COE, iterations=1)).model
  extra = 0 if shared_router else 2 * D * E  # 2 unique layers, one more router each
  assert recursion.non_embedding_params(cfg.model) == recursion.non_embedding_params(plain) + extra


def test_paper_parameter_counts():
  """Spec §2.5 check 5 / §2.3: 544.51 (MoE, 63 routed + 1 shared of width 704, 4 layers, d=1024),
  544.75 (CoE-2: one more 63 x 1024 gate per layer), 412.63 (CoE-2 with 47 + 1) in units of
  2^20. Our count with our GQA attention replaced by the paper's MLA (q 1024 x 8 x 192,
  kv_a 1024 x 576 + its norm 512, kv_b 512 x 8 x 256, o 1024 x 1024) per layer."""
  mla = 1024 * 8 * 192 + 1024 * 576 + 512 + 512 * 8 * 256 + 8 * 128 * 1024
  want = {(63, 1): (570_956_800, 544.51), (63, 2): (571_214_848, 544.75),
          (47, 2): (432_671_744, 412.63)}
  for (routed, c), (params, mib) in want.items():
    m = tiny_config(d_model=1024, num_layers=4, num_heads=8, num_kv_heads=8, d_ff=704,
                    moe=dict(num_experts=routed, top_k=8 // c, d_ff=704, num_shared_experts=1,
                             iterations=c, coe_residual="inner")).model
    gqa = 1024 * 128 * 2 * (8 + 8)
    count = recursion.non_embedding_params(m) - 4 * gqa + 4 * mla
    assert count == params
    assert round(count / 2**20, 2) == mib


def test_coe_lm_trains_and_reports_aux():
  cfg = tiny_config(moe=dict(COE, balance_scope="sequence", balance_coeff=0.004))
  cfg.train.lr, cfg.train.warmup_steps = 1e-2, 0
  state, train_step = train_setup(cfg, 12)
  state, metrics, losses = fit(state, train_step, random_batch(), 12)
  assert losses[-1] < 0.7 * losses[0], losses
  assert float(metrics["moe/layers"]) == 2
  np.testing.assert_allclose(metrics["moe/load"].sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/moe_balance"], 2 * 0.004 * metrics["moe/balance"],
                             rtol=1e-5)  # a sum over the 2 gate calls of each layer


def test_coe_in_a_tied_core_decodes_like_the_full_forward():
  """One shared CoE block (inner wiring) run at 2 depths; prefill then one-token steps."""
  cfg = tiny_config(vocab_size=64, num_layers=2, recursion=dict(strategy="cycle",
                                                                 num_recursions=2), moe=COE)
  assert_decodes_like_forward(cfg)


def test_the_coe_preset_mirrors_the_paper_at_tiny_scale():
  c = moe_config.get_config("tiny,coe")
  config_lib.validate(c)
  m = c.model.moe
  assert (m.num_experts, m.num_shared_experts, m.top_k, m.iterations) == (15, 1, 2, 2)
  assert (m.coe_residual, m.renormalize, m.balance_scope, m.coe_shared_router) == (
      "inner", False, "sequence", False)
  assert m.d_ff == c.model.d_ff // 4 and m.balance_coeff == pytest.approx(0.004)
  base = moe_config.get_config("tiny,coe=1")  # the paper's MoE baseline: K = 2 x 2, same wiring
  assert (base.model.moe.top_k, base.model.moe.iterations, base.model.moe.coe_residual) == (
      4, 1, "inner")
  plain = moe_config.get_config("tiny").model.moe
  assert (plain.iterations, plain.coe_residual, plain.num_experts) == (1, "outer", 8)
  cfg = config_lib.with_derived(moe_config.get_config("small,coe"), 8192)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0)))
  assert model.core.blocks[0].ffn.router.w1.shape == (2, 256, 15)
  for arg, needle in [("tiny,coe=3", "C=3 must divide 4"), ("tiny,coe=x", "'coe=x' is not"),
                      ("tiny,moe=2", "'moe=2' is not"), ("tiny,coe,rmoe", "one variant")]:
    with pytest.raises(ValueError, match=needle):
      moe_config.get_config(arg)


@pytest.mark.parametrize("moe_keys,needle", [
    (dict(iterations=0), "config.model.moe.iterations=0: must be > 0"),
    (dict(num_experts=0), "config.model.moe.iterations=2: Chain-of-Experts iterates"),
    (dict(coe_residual="paper"), "config.model.moe.coe_residual='paper': must be one of"),
    (dict(iterations=1, coe_shared_router=True),
     "config.model.moe.coe_shared_router=True: shares one router"),
    (dict(balance_scope="token"), "config.model.moe.balance_scope='token'"),
])
def test_invalid_coe_configs_name_the_key(moe_keys, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    tiny_config(moe=dict(COE, **moe_keys))
  assert needle in str(e.value)
