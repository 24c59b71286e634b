"""Mixture-of-Recursions: routing invariants, fast paths against references (spec §8 checks).

Shapes are tiny (T=16, d=32, middle-cycle 1 + 1x3 + 1); one jitted forward per core config,
shared across the tests that use it.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from flax import nnx

from research import config as config_lib
from research import routing
from research.model import mor, recursion
from research.model.layers import Block, Site, Tokens
from research.model.lm import LanguageModel
from tests.model_util import tiny_config, train_setup, with_mor

T = 16


def mor_config(**overrides) -> mlc.ConfigDict:
  """tiny_config at middle-cycle 1 + 1x3 + 1, expert-choice MoR; overrides: dotted keys under
  model.mor."""
  cfg = tiny_config(num_layers=5)
  cfg.model.recursion.update(strategy="middle_cycle", num_recursions=3)
  cfg.model.mor.kind = "expert"
  return with_mor(cfg, overrides)


@functools.cache
def core_and_forward(**overrides):
  """(MoR core with seed-0 weights, forward(core, x, tok) jitted once per config)."""
  cfg = mor_config(**overrides)
  m = cfg.model
  plan = recursion.make_plan("middle_cycle", 5, 3)
  rngs = nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    blocks = [Block(m, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)]
    core = recursion.Recursion(plan, blocks, m, remat=False, param_dtype=jnp.float32, rngs=rngs)
  graphdef = nnx.graphdef(core)

  def forward(state, x, tok):
    y, aux, _ = nnx.merge(graphdef, state).forward(x, tok)
    return y, {k: v for k, v in aux.items() if not k.startswith("route/")}, mor.routes(aux)

  fwd = jax.jit(forward)
  return core, lambda core, x, tok: fwd(nnx.state(core), x, tok)


def inputs(seed=0):
  """Row 0: two packed documents (9 + 7 tokens); row 1: 13 tokens then 3 padding."""
  x = jax.random.normal(jax.random.key(seed), (2, T, 32))
  idx = jnp.broadcast_to(jnp.arange(T), (2, T))
  seg = np.ones((2, T), np.int32)
  seg[0, 9:] = 2
  seg[1, 13:] = 0
  pos = np.stack([np.r_[np.arange(9), np.arange(7)], np.arange(T)])
  return x, Tokens(jnp.asarray(pos, jnp.int32), jnp.asarray(seg), idx.astype(jnp.int32))


BASE = dict(capacity=(0.75, 0.5, 0.25))  # c_1 < 1: some real tokens never run a step


def run(x=None, tok=None, **overrides):
  core, fwd = core_and_forward(**(overrides or BASE))
  x0, tok0 = inputs()
  return fwd(core, x0 if x is None else x, tok0 if tok is None else tok)


# ----------------------------------------------------------------------------------------------
# Expert choice: routes (checks 2, 3), padding, the per-row Python reference (check 4, #17).


@pytest.mark.parametrize("overrides,ks", [(BASE, (12, 8, 4)), (dict(kv="share"), (16, 10, 5))])
def test_routes_have_exact_k_sorted_nested_and_skip_padding(overrides, ks):
  _, _, routes = run(**overrides)
  _, tok = inputs()
  real = np.asarray(tok.segments) != 0
  assert routing.tokens_per_step(mor.capacities(mor_config(**overrides).model), T) == ks
  prev = real
  for r, (idx, valid, sel) in enumerate(zip(routes.indices, routes.valid, routes.selected,
                                            strict=True)):
    idx, valid, sel = np.asarray(idx), np.asarray(valid), np.asarray(sel)
    assert idx.shape == (2, ks[r])
    for b in range(2):
      assert (np.diff(idx[b]) > 0).all()  # sorted, no index repeats
      chosen = idx[b][valid[b]]
      assert len(chosen) == min(ks[r], prev[b].sum())  # k_r, or every real candidate
      assert prev[b][chosen].all()  # S_r is a subset of S_{r-1}: never padding
      np.testing.assert_array_equal(np.flatnonzero(sel[b]), chosen)
    prev = sel
  np.testing.assert_array_equal(routes.depth, sum(np.asarray(s, int) for s in routes.selected))


call = nnx.jit(lambda f, *args: f(*args))  # a module call, compiled once per shape


def reference_expert(core, x_BTD, tok):
  """Slow obvious expert-choice MoR: per row and step, Python top-k, one block call per depth of
  the step (its LoRA and norm scales when the recursion is relaxed)."""
  e, out, depths = core.rule.cfg.expert, [], []
  b_layers = core.plan.num_shared
  for b in range(x_BTD.shape[0]):
    h = x_BTD[b]
    cand = [t for t in range(T) if tok.segments[b, t] != 0]
    depth = np.zeros(T, int)
    for r, cap in enumerate(core.rule.capacity):
      s = np.asarray(call(core.router, h[None, np.array(cand)], r))[0, :, 0]
      g = e.alpha / (1 + np.exp(-s.astype(np.float64)))
      order = sorted(range(len(cand)), key=lambda i, g=g: (-g[i], i))[:max(1, int(cap * T))]
      chosen = sorted(cand[i] for i in order)
      gate = {cand[i]: g[i] for i in order}
      idx = np.array(chosen)
      sub = Tokens(tok.positions[b, idx][None], tok.segments[b, idx][None],
                   jnp.asarray(idx, jnp.int32)[None])
      y = h[idx][None]
      for depth_i in range(r * b_layers, (r + 1) * b_layers):
        block, lora, norms = core.at_depth(depth_i)  # the same (tied) block at every step
        y = call(block, y, sub, lora, norms)  # with the depth's LoRA and norms, if relaxed
      w = np.asarray([gate[t] for t in chosen], np.float32)[:, None]
      h = np.asarray(h).copy()
      h[idx] += w * np.asarray(y[0])
      depth[idx] += 1
      cand = chosen
    out.append(h)
    depths.append(depth)
  return np.stack(out), np.stack(depths)


def test_expert_choice_matches_the_per_row_python_reference():
  core, fwd = core_and_forward(**BASE)
  x, tok = inputs()
  y, _, routes = fwd(core, x, tok)
  want, depth = reference_expert(core, x, tok)
  np.testing.assert_array_equal(routes.depth, depth)
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)
  # issue #17: one set of attention weights serves every recursion step
  assert len(core.blocks) == core.plan.num_shared == 1
  assert set(core.plan.order) == {0}


def test_zero_router_gates_every_token_at_alpha_half_and_keeps_the_first_k():
  core, fwd = core_and_forward(**BASE)
  x, tok = inputs()
  w1 = core.router.w1
  saved = w1[...]
  w1[...] = jnp.zeros_like(saved)
  try:
    y, _, routes = fwd(core, x, tok)
    want, _ = reference_expert(core, x, tok)
  finally:
    w1[...] = saved
  np.testing.assert_allclose(routing.expert_gate(jnp.zeros(3), "sigmoid", 0.1), 0.05)
  np.testing.assert_array_equal(routes.indices[2][0], np.arange(4))  # ties: earliest tokens
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


def reference_token(core, x_BTD, tok):
  """Slow obvious token-choice MoR: per row, Python argmax depths, first-come slots per step."""
  tc, nr, out = core.rule.cfg.token, core.plan.num_recursions, []
  slots = routing.token_buffers(nr, T, tc.capacity_factor)
  for b in range(x_BTD.shape[0]):
    x1 = np.asarray(x_BTD[b])
    logits = np.asarray(call(core.router, x_BTD[b][None], 0))[0]
    p = tc.alpha * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    real = [t for t in range(T) if tok.segments[b, t] != 0]
    want = {t: int(np.argmax(p[t])) + 1 for t in real}
    depth, ran = dict.fromkeys(real, 0), real
    for r in range(nr):  # steps a token really runs: its own choice, capped by the slots
      ran = [t for t in ran if want[t] > r][:slots[r]]
      for t in ran:
        depth[t] += 1
    state = x1.copy()
    for r in range(nr):
      active = np.array([t for t in real if depth[t] > r], int)
      sub = Tokens(tok.positions[b, active][None], tok.segments[b, active][None],
                   jnp.asarray(active, jnp.int32)[None])
      y = np.asarray(call(core.blocks[0], jnp.asarray(state[active])[None], sub))[0]
      for i, t in enumerate(active):
        w = p[t, want[t] - 1]
        if depth[t] == r + 1:
          state[t] = x1[t] + w * y[i]
        else:
          state[t] = w * y[i] if tc.gate == "every" else y[i]
    out.append(state)
  return np.stack(out)


@pytest.mark.parametrize("gate", ["exit", "every"])
def test_token_choice_matches_the_per_row_python_reference(gate):
  overrides = {"kind": "token", "token.capacity_factor": 0.8, "token.gate": gate}
  core, fwd = core_and_forward(**overrides)
  x, tok = inputs()
  y, _, routes = fwd(core, x, tok)
  np.testing.assert_allclose(y, reference_token(core, x, tok), atol=2e-5, rtol=1e-5)
  assert int(np.max(np.sum(routes.selected[2], axis=1))) <= 5  # ceil(0.8 * 16 / 3) slots


def test_capacity_warmup_selects_everyone_first_and_the_capacities_after():
  core, fwd = core_and_forward(**BASE, **{"expert.cap_warmup_steps": 10})
  x, tok = inputs()
  _, _, early = fwd(core, x, tok)  # counter 0: capacity 1 at every step
  real = np.asarray(tok.segments) != 0
  for sel in early.selected:
    np.testing.assert_array_equal(sel, real)
  core.counter[...] = jnp.asarray(10, jnp.int32)
  _, _, late = fwd(core, x, tok)
  _, _, plain = run()
  for a, b in zip(late.selected, plain.selected, strict=True):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Gathered fast path against the masked full-length reference (checks 5 and 7).

PAIRS = {
    "expert_cache": BASE,
    "expert_share": dict(kv="share"),
    "expert_share_update": dict(kv="share_update"),
    "token_cache": {"kind": "token", "token.capacity_factor": 0.8,  # overflow drops tokens
                    "token.gate": "exit"},
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_gathered_path_equals_the_masked_reference(name):
  x, _ = inputs()
  y_g, aux_g, r_g = run(**PAIRS[name])
  y_m, aux_m, r_m = run(impl="masked", **PAIRS[name])
  for a, b in zip(r_g.selected, r_m.selected, strict=True):
    np.testing.assert_array_equal(a, b)
  ran = np.asarray(r_g.depth) > 0
  np.testing.assert_allclose(np.asarray(y_g)[ran], np.asarray(y_m)[ran], atol=2e-5, rtol=1e-5)
  for y in (y_g, y_m):  # rows no step selected are bit-identical to the input
    np.testing.assert_array_equal(np.asarray(y)[~ran], np.asarray(x)[~ran])
  assert (~ran).any()
  for k in set(aux_g) - {"mor/computed_frac"}:  # the slots run: the buffers vs the whole row
    np.testing.assert_allclose(aux_g[k], aux_m[k], atol=1e-5, rtol=1e-5, err_msg=k)
  if "token" in name:
    np.testing.assert_allclose(aux_g["mor/computed_frac"], np.asarray([13, 9, 5]) / T)
    assert {"mor/load", "mor/maxvio", "mor/entropy", "loss/mor_balance"} <= set(aux_g)
  else:
    assert aux_g["mor/threshold_acc"].shape == (3,) and aux_g["mor/hist_selected"].shape == (3, 10)


EXACT = {"kind": "token", "token.gate": "every",  # capacity_factor 0: no token is dropped
         "token.exact_buckets": 4}


def test_exact_token_choice_runs_each_step_in_the_smallest_bucket_with_the_same_results():
  """Exact token choice (capacity_factor 0) runs step r >= 2 on a static bucket of
  ceil(i T / 4) slots (mor.exact_step) instead of the whole row: values and gradients equal the
  whole-row run (exact_buckets=1) and the masked reference."""
  assert mor.exact_sizes(16, 4) == (4, 8, 12, 16) and mor.exact_sizes(5, 4) == (2, 3, 4, 5)
  x, tok = inputs()
  results = {}
  for name, extra in [("bucketed", {}), ("row", {"token.exact_buckets": 1}),
                      ("masked", {"impl": "masked"})]:
    core, fwd = core_and_forward(**{**EXACT, **extra})
    y, aux, routes = fwd(core, x, tok)
    graphdef, state = nnx.split(core)

    def loss(state, x, graphdef=graphdef):
      y, aux, _ = nnx.merge(graphdef, state).forward(x, tok)
      return jnp.sum(jnp.sin(y)) + aux["loss/mor_balance"]

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    results[name] = (y, aux, routes, grads)
  y, aux, routes, (g_state, g_x) = results["bucketed"]
  counts = [int(np.max(np.sum(np.asarray(s), axis=1))) for s in routes.selected]
  sizes = [T] + [min(k for k in mor.exact_sizes(T, 4) if k >= c) for c in counts[1:]]
  assert min(sizes) < T  # the input makes some step run on fewer slots than the row
  np.testing.assert_allclose(aux["mor/computed_frac"], np.asarray(sizes) / T)
  for other in ("row", "masked"):
    y_o, aux_o, routes_o, (g_state_o, g_x_o) = results[other]
    np.testing.assert_array_equal(aux_o["mor/computed_frac"], np.ones(3))
    np.testing.assert_array_equal(routes.depth, routes_o.depth)
    np.testing.assert_allclose(y, y_o, atol=2e-5, rtol=1e-5, err_msg=other)
    for k in set(aux) - {"mor/computed_frac"}:
      np.testing.assert_allclose(aux[k], aux_o[k], atol=1e-5, rtol=1e-5, err_msg=f"{other} {k}")
    np.testing.assert_allclose(g_x, g_x_o, atol=2e-5, rtol=1e-4, err_msg=other)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_state),
                                 jax.tree_util.tree_leaves_with_path(g_state_o), strict=True):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"{other} {path}")


def test_a_block_attending_over_stored_kv_reproduces_the_block():
  core, _ = core_and_forward()
  x, tok = inputs()
  idx = jnp.asarray([[0, 3, 4, 9, 15]] * 2)

  @nnx.jit
  def outputs(block):
    y, _, carry = block.forward(x, tok, site=Site("s", keep=True))
    # queries on a subset over K/V shared from the same input give the same rows (check 7)
    y_sub, _, _ = block.forward(routing.gather_rows(x, idx), tok.take(idx), site=Site(shared="s"),
                                carry=carry)
    return y, carry.kv["s"].k, block(x, tok), y_sub

  y, k, want, y_sub = outputs(core.blocks[0])
  np.testing.assert_array_equal(y, want)
  assert k.shape == (2, T, 2, 8)
  np.testing.assert_allclose(y_sub, routing.gather_rows(y, idx), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Check 6: top-k routing reads the future, threshold routing does not.


def test_topk_leaks_future_tokens_and_threshold_routing_is_causal():
  x, tok = inputs()
  x0 = np.r_[5.0, np.arange(10, 17), np.arange(1, 5), -np.arange(1, 5)]
  x = x.at[:, :, 0].set(jnp.asarray(x0))  # steps 1-2 rank by x0: step 2 (k=8) keeps 1..7, 0
  tok = tok._replace(segments=jnp.ones_like(tok.segments))
  future = x.at[:, 15, 0].set(30.0)  # token 15 climbs into both top-k's and evicts token 0
  for overrides in (BASE, dict(impl="masked", **{"expert.route": "threshold"})):
    core, fwd = core_and_forward(**overrides)
    w1 = core.router.w1
    saved = w1[...]
    w1[...] = jnp.zeros_like(saved).at[:2, 0, 0].set(0.2)  # steps 1-2 score 0.2 x[..., 0]
    try:
      (y, _, r), (y2, _, r2) = fwd(core, x, tok), fwd(core, future, tok)
    finally:
      w1[...] = saved
    if overrides is BASE:  # top-k: a future token changes the routing and output of token 0
      assert bool(r.selected[1][0, 0]) and not bool(r2.selected[1][0, 0])
      assert not np.allclose(y[0, 0], y2[0, 0], atol=1e-4)
    else:  # threshold (sigma(s) > 0.5): outputs before position 15 depend on tokens <= t only
      assert bool(r.selected[1][0, 0]) and bool(r2.selected[1][0, 15])
      np.testing.assert_array_equal(np.asarray(y)[:, :15], np.asarray(y2)[:, :15])


# ----------------------------------------------------------------------------------------------
# Check 1: sharing map and parameters.


def count(model_cfg) -> int:
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("router,hidden", [("linear", 0), ("mlp", 64), ("wide_mlp", 128)])
def test_mor_adds_only_router_parameters_to_the_recursive_model(router, hidden):
  cfg = mor_config(router=router)
  plain = mlc.ConfigDict(cfg.model.to_dict())
  plain.mor.kind = "none"
  d = cfg.model.d_model
  per_router = d * hidden + hidden if hidden else d
  assert count(cfg.model) - count(plain) == 3 * per_router
  emb = cfg.model.vocab_size * d
  assert count(plain) - emb == recursion.non_embedding_params(plain)
  tok = mor_config(router=router, kind="token")
  assert count(tok.model) - count(plain) == (d * hidden + hidden * 3 if hidden else d * 3)


def test_config_errors_name_the_key():
  for overrides, match in [
      (dict(capacity=(1.0, 0.5, 0.75)), "model.mor.capacity.*non-increasing"),
      (dict(capacity=(1.0, 0.5)), "model.mor.capacity.*one capacity per recursion"),
      (dict(capacity=(0.5, 0.5, 0.25), kv="share"), "model.mor.capacity.*c_1 = 1"),
      ({"expert.route": "threshold"}, "model.mor.impl"),
      (dict(kind="token", kv="share_update"), "model.mor.kv"),
  ]:
    with pytest.raises(config_lib.ConfigError, match=match):
      mor_config(**overrides)
  cfg = tiny_config(num_layers=6)
  cfg.model.recursion.update(strategy="sequence", num_recursions=2)
  cfg.model.mor.kind = "expert"
  with pytest.raises(config_lib.ConfigError, match=r"model\.recursion\.strategy"):
    config_lib.validate(cfg)


# ----------------------------------------------------------------------------------------------
# Check 10: the auxiliary BCE makes the causal rule sigma(s) > 0.5 agree with top-k.


def test_aux_bce_trains_a_router_to_the_threshold_rule():
  b, t, d, k = 8, 32, 16, 10
  x = jax.random.normal(jax.random.key(0), (b, t, d)).at[..., 0].set(1.0)  # a mean direction
  valid = jnp.ones((b, t), bool)
  w0 = (0.02 * jax.random.normal(jax.random.key(1), (d, 1))).at[0].set(0.5)  # all pass
  tx = optax.adam(1e-2)

  def stats(w):
    s = (x @ w)[..., 0]
    _, _, target = routing.select_topk(routing.expert_gate(s, "sigmoid", 0.1), valid, k)
    return s, target

  def train(w, _):
    w, opt = w

    def loss(w):
      s, target = stats(w)
      return routing.bce_loss(s, jax.lax.stop_gradient(target), valid)

    g = jax.grad(loss)(w)
    upd, opt = tx.update(g, opt)
    return (optax.apply_updates(w, upd), opt), None

  def accuracy(w):
    s, target = stats(w)
    p = jax.nn.sigmoid(s)
    middle = jnp.mean((p > 0.2) & (p < 0.8))
    return routing.threshold_accuracy(s, target, valid), middle, p[target].mean(), p[~target].mean()

  (w, _), _ = jax.jit(lambda w: jax.lax.scan(train, (w, tx.init(w)), None, length=300))(w0)
  before, middle0, *_ = accuracy(w0)
  after, middle, p_selected, p_passed = accuracy(w)
  assert float(before) < 0.7 and float(after) > 0.95, (before, after)
  # the scores turn bimodal (Fig. 5b): selected near 1, passed-over near 0
  assert float(middle0) == 1.0 and float(middle) < 0.3
  assert float(p_selected) > 0.7 and float(p_passed) < 0.2


# ----------------------------------------------------------------------------------------------
# Check 11: token-choice balancing.


def test_balancing_loss_is_one_for_a_uniform_router_and_balanced_choices():
  valid = jnp.ones((2, 6), bool)
  uniform = jnp.full((2, 6, 3), 1 / 3)
  for choice in (jnp.zeros((2, 6), int), jnp.tile(jnp.arange(3), (2, 2))):
    np.testing.assert_allclose(routing.balancing_loss(uniform, choice, valid), 1.0, rtol=1e-6)
  skewed = jax.nn.softmax(jnp.tile(jnp.asarray([3.0, 0, 0]), (2, 6, 1)))
  assert float(routing.balancing_loss(skewed, jnp.zeros((2, 6), int), valid)) > 2.0


def test_loss_free_bias_moves_toward_underloaded_depths_and_lowers_maxvio():
  logits = jax.random.normal(jax.random.key(0), (4, 64, 3)) + jnp.asarray([[[1.0, 0.0, -0.5]]])
  probs, valid = jax.nn.softmax(logits), jnp.ones((4, 64), bool)

  def update(bias, _):
    load = routing.load(routing.top1_depth(probs, bias), valid, 3)
    return routing.loss_free_bias(bias, load, 0.01), routing.max_violation(load)

  first = routing.load(routing.top1_depth(probs, jnp.zeros(3)), valid, 3)
  np.testing.assert_allclose(routing.loss_free_bias(jnp.zeros(3), first, 0.01),
                             0.01 * np.sign(np.mean(first) - first))
  _, vio = jax.lax.scan(update, jnp.zeros(3), None, length=100)
  assert float(vio[0]) > 0.5 and float(vio[-20:].mean()) < 0.5 * float(vio[0])


def test_train_step_writes_the_loss_free_bias_and_counter_after_the_update():
  cfg = mor_config(kind="token", **{"token.balancing": "loss_free", "token.bias_rate": 0.01,
                                    "token.bal_warmup_steps": 1})
  state, train_step = train_setup(cfg, 10, "skip")
  tokens = jax.random.randint(jax.random.key(0), (4, T + 1), 0, 64)
  batch = dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(T + 1), (4, T + 1)),
               segment_ids=jnp.ones((4, T + 1), jnp.int32))
  state, metrics = train_step(state, batch)  # balance warm-up: every token at depth Nr, b = 0
  assert int(state["other"]["core"]["counter"][...]) == 1
  np.testing.assert_array_equal(state["other"]["core"]["bias"][...], np.zeros(3))
  np.testing.assert_allclose(metrics["mor/depth_frac"], [0, 0, 0, 1])
  assert not any(k.startswith("update/") for k in metrics)
  state, metrics = train_step(state, batch)
  load = np.asarray(metrics["mor/load"])
  np.testing.assert_allclose(state["other"]["core"]["bias"][...],
                             0.01 * np.sign(load.mean() - load), atol=1e-7)
  state["params"] = jax.tree.map(lambda p: p * jnp.nan, state["params"])
  before = state["other"]["core"]["bias"][...]
  state, _ = train_step(state, batch)  # a non-finite step changes no variable
  np.testing.assert_array_equal(state["other"]["core"]["bias"][...], before)
  assert int(state["other"]["core"]["counter"][...]) == 2


def test_capacity_warmup_starts_at_one_and_decays_to_c():
  cap = [float(routing.warmup_capacity(0.25, jnp.asarray(s), 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(cap, [1.0, 0.625, 0.25, 0.25], atol=1e-6)
  assert int(routing.live_tokens(jnp.asarray(0.25), 2048)) == 512
