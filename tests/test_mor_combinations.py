"""MoR routing plugged into the one recursion core, combined with what the core does elsewhere:
per-depth LoRA and untied norms, MoE layers in the shared block, initialisation from a pretrained
model with a different depth (recursion.stretch_init). Tiny shapes (T = 16, d = 32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.convert import recursive_init
from research.model import mor, recursion
from research.model.layers import Tokens
from research.model.lm import LanguageModel
from tests.model_util import fit, random_batch, tiny_config, train_setup, with_mor
from tests.test_mor import reference_expert

T = 16
MC3 = dict(strategy="middle_cycle", num_recursions=3)
CAPS = {"capacity": (0.75, 0.5, 0.25)}  # c_1 < 1: some tokens never run a step
RELAXED = dict(MC3, lora_rank=4, share_norms=False)
DROPLESS_MOE = dict(num_experts=4, top_k=2, d_ff=16)


def config(rec: dict, mor_overrides: dict, moe: dict | None = None, layers: int = 5):
  cfg = tiny_config(num_layers=layers)
  cfg.model.recursion.update(rec)
  cfg.model.moe.update(moe or {})
  return with_mor(cfg, mor_overrides)


@functools.cache
def relaxed_model(impl: str, kind: str = "expert", moe: tuple = ()) -> LanguageModel:
  """A seed-0 MoR model with LoRA + untied norms (or MoE), its LoRA B factors and norm scales
  randomised so that every depth differs (a fresh LoRA is the identity relaxation)."""
  overrides = dict(CAPS, kind="expert") if kind == "expert" else {"kind": "token",
                                                                  "token.capacity_factor": 0.8}
  cfg = config(RELAXED if not moe else MC3, dict(overrides, impl=impl), dict(moe))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  core, key = model.core, jax.random.key(7)
  if core.lora is not None:
    for i, name in enumerate(core.lora.names):
      b = getattr(core.lora, f"{name}_b")
      b[...] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), b.shape)
    core.attn_norms[...] = 1 + 0.3 * jax.random.normal(key, core.attn_norms.shape)
  return model


@nnx.jit
def core_forward(model, x_BTD, tok):
  y, aux, _ = model.core.forward(x_BTD, tok)
  return y, mor.routes(aux).depth, {k: v for k, v in aux.items() if not k.startswith("route/")}


def inputs():
  """Row 0: two packed documents (9 + 7 tokens); row 1: 13 tokens then 3 padding."""
  x = jax.random.normal(jax.random.key(0), (2, T, 32))
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  seg = np.ones((2, T), np.int32)
  seg[0, 9:] = 2
  seg[1, 13:] = 0
  pos = np.stack([np.r_[np.arange(9), np.arange(7)], np.arange(T)])
  return x, Tokens(jnp.asarray(pos, jnp.int32), jnp.asarray(seg), idx)


def same_weights(a: LanguageModel, b: LanguageModel) -> LanguageModel:
  """Model b holding model a's parameters (same tree)."""
  nnx.update(b, nnx.state(a))
  return b


@pytest.mark.parametrize("kind,moe", [("expert", ()), ("token", ()),
                                      ("expert", tuple(DROPLESS_MOE.items()))])
def test_gathered_equals_masked_with_lora_norms_or_moe(kind, moe):
  """The gathered path (the step runs on its tokens only) equals the masked full-length reference
  with per-depth LoRA and untied norms, or with a dropless MoE layer in the shared block."""
  gathered = relaxed_model("gather", kind, moe)
  masked = same_weights(gathered, relaxed_model("masked", kind, moe))
  x, tok = inputs()
  y_g, d_g, aux_g = core_forward(gathered, x, tok)
  y_m, d_m, aux_m = core_forward(masked, x, tok)
  np.testing.assert_array_equal(d_g, d_m)
  ran = np.asarray(d_g) > 0
  np.testing.assert_allclose(np.asarray(y_g)[ran], np.asarray(y_m)[ran], atol=3e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(y_g)[~ran], np.asarray(x)[~ran])
  assert (~ran).any() and (np.asarray(d_g) == 3).any()
  for k in set(aux_g) - {"mor/computed_frac"}:  # token choice: its steps' buckets vs the row
    np.testing.assert_allclose(aux_g[k], aux_m[k], atol=1e-5, rtol=1e-5, err_msg=k)
  if moe:
    assert aux_g["moe/layers"] == 3  # the one shared MoE layer, applied at each of the 3 steps
    assert {"loss/moe_balance", "loss/mor_bce"} <= set(aux_g)


def test_expert_choice_with_lora_and_untied_norms_matches_a_per_row_loop():
  """Per row and step: Python top-k over the candidates, the step's depth run with that depth's
  LoRA and norm scales (core.at_depth) on the chosen tokens, H += g f(H)."""
  model = relaxed_model("gather")
  x, tok = inputs()
  y, depth, _ = core_forward(model, x, tok)
  want, want_depth = reference_expert(model.core, x, tok)
  np.testing.assert_array_equal(depth, want_depth)
  np.testing.assert_allclose(y, want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("rec,moe", [(dict(MC3, lora_rank=4), {}), (MC3, DROPLESS_MOE),
                                     (MC3, dict(DROPLESS_MOE, router="gru", gru_dim=8))])
def test_mor_combinations_train(rec, moe):
  """A few steps on one batch lower the loss; LoRA and MoE receive gradients."""
  cfg = config(rec, {"kind": "expert"}, moe)
  state, step = train_setup(cfg, 8)
  start = jax.tree.map(np.asarray, state["params"])
  state, metrics, losses = fit(state, step, random_batch(), 8)
  assert losses[-1] < losses[0] - 0.05, losses
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], start)
  core = moved["core"]
  if rec.get("lora_rank"):
    assert all(jax.tree.leaves(core["lora"]))
  if moe:
    assert all(jax.tree.leaves(core["blocks"][0]["ffn"]))
    assert "moe/balance" in metrics and "mor/bce" in metrics
  assert not any(k.startswith("route/") for k in metrics)  # decisions are not metrics


def test_refused_combinations_say_why():
  with pytest.raises(config_lib.ConfigError, match=r"lora_merged.*MoR routes tokens per step"):
    config(dict(MC3, lora_rank=4, lora_merged=True), {"kind": "expert"})
  with pytest.raises(config_lib.ConfigError, match=r"early_exit.*MoR routes tokens"):
    config(dict(MC3, early_exit=True), {"kind": "expert"})


def test_stretch_init_spreads_the_pretrained_middle_over_more_depths():
  """A 6-layer vanilla model into a 1 + 2x3 + 1 = 8-layer Middle-Cycle MoR (stretch_init): the
  first and last layers are copied, the middle depths map onto the 4 pretrained middle layers
  by round(d (M0 - 1) / (M - 1)), stepwise picks round(linspace(1, 4, 2)), average the depths'
  layers, and the routers stay at their fresh init."""
  plan = recursion.make_plan("middle_cycle", 8, 3)
  assert recursive_init.depth_sources(plan, 6) == [1, 2, 2, 3, 3, 4]
  assert recursive_init.depth_sources(recursion.make_plan("middle_cycle", 6, 2), 6) == [1, 2, 3, 4]
  assert recursive_init.shared_sources(plan, "stepwise", 6) == [[1], [4]]
  assert recursive_init.shared_sources(plan, "average", 6) == [[1, 2, 3], [2, 3, 4]]
  assert recursive_init.shared_sources(plan, "lower", 6) == [[1], [2]]
  vanilla_cfg = tiny_config(num_layers=6)
  with nnx.use_eager_sharding(False):
    vanilla = LanguageModel(vanilla_cfg.model, rngs=nnx.Rngs(3))
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(vanilla, nnx.Param)))
  cfg = config(dict(MC3, stretch_init=True), {"kind": "expert"}, layers=8).model
  params = recursive_init.recursive_params(pure, cfg, "stepwise")
  blocks = pure["core"]["blocks"]
  leaf = lambda block: block["attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(leaf(params["prelude"]["blocks"][0]), leaf(blocks[0]))
  np.testing.assert_array_equal(leaf(params["coda"]["blocks"][0]), leaf(blocks[5]))
  np.testing.assert_array_equal(leaf(params["core"]["blocks"][1]), leaf(blocks[4]))
  assert "router" not in params["core"]  # fresh: the model's own init is kept
  cfg.recursion.stretch_init = False
  with pytest.raises(ValueError, match="stretch_init"):
    recursive_init.recursive_params(pure, cfg, "stepwise")
