"""RRT training features: merged LoRA, early exits and their losses, teacher distillation.

Spec checks (docs/methods/rrt_coe_rmoe_rexmoe.md §1.4-1.5, §1.8 check 7): the merged per-loop
LoRA equals the per-depth one and batches rows at different loops; exit logits are the final
norm + head after each loop; Weighted gives (1/3, 2/3) and (1/6, 1/3, 1/2), Aggressive(0.1)
gives (0.1, 1); the intermediate KD term sends no gradient into the final output; forward KL
from a teacher identical to the student is 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from research import config as config_lib
from research.model.layers import Tokens
from research.model.lm import LanguageModel
from research.train import step
from tests import launch_util
from tests.model_util import tiny_config
from tests.test_recursive_init import TINY, tiny  # noqa: F401  (the fixture)

B, T = 3, 8


def new_model(cfg, seed: int = 0) -> LanguageModel:
  with nnx.use_eager_sharding(False):
    return LanguageModel(cfg.model, rngs=nnx.Rngs(seed))


def relaxed_model(strategy="cycle", merged=False, **model) -> tuple:
  """A tiny relaxed model (LoRA rank 3, untied norms) with every LoRA B and norm scale random."""
  cfg = tiny_config(num_layers=4 if strategy == "cycle" else 6, **model)
  cfg.model.recursion.update(strategy=strategy, num_recursions=2, lora_rank=3,
                             share_norms=False, lora_merged=merged)
  config_lib.validate(cfg)
  model = new_model(cfg)
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  randomised = jax.tree_util.tree_map_with_path(
      lambda path, x: (x + 0.3 * jax.random.normal(next(keys), x.shape)
                       if any(getattr(k, "key", "") in ("attn_norms", "ffn_norms")
                              or str(getattr(k, "key", "")).endswith("_b") for k in path)
                       else x), params)
  nnx.update(model, randomised)
  return cfg, model


def tokens(seed=0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 64)


@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_merged_lora_equals_per_depth_lora(strategy):
  _, plain = relaxed_model(strategy)
  _, merged = relaxed_model(strategy, merged=True)
  nnx.update(merged, nnx.state(plain, nnx.Param))
  x = tokens()
  want, _, _ = plain(x)
  got, _, _ = merged(x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(want - plain.logits(plain.embed(x))))) > 1e-2  # LoRAs matter


def test_loop_step_runs_each_row_at_its_own_loop():
  """Depth-wise batching: one batch whose rows are at loops (0, 1, 0) equals running each row
  alone at its loop (the merged LoRA and the untied norms are picked per row)."""
  _, model = relaxed_model("cycle", merged=True)
  core = model.core
  x_BTD = jax.random.normal(jax.random.key(2), (B, T, 32))
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  tok = Tokens(positions=idx, segments=jnp.ones((B, T), jnp.int32), indices=idx)
  loop_B = jnp.asarray([0, 1, 0], jnp.int32)
  got, _ = core.loop_step(x_BTD, tok, loop_B)
  for b in range(B):
    row = Tokens(*(a[b:b + 1] for a in tok))
    want, _ = core.loop_step(x_BTD[b:b + 1], row, loop_B[b:b + 1])
    np.testing.assert_allclose(got[b:b + 1], want, atol=1e-5, rtol=1e-5)
  assert not np.allclose(got[1], core.loop_step(x_BTD, tok, jnp.zeros(B, jnp.int32))[0][1])


@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_exit_logits_are_the_head_after_each_loop(strategy):
  _, model = relaxed_model(strategy)
  x = tokens()
  exits, _, _ = model(x, exits=True)
  final, _, _ = model(x)
  assert len(exits) == 2
  np.testing.assert_array_equal(exits[-1], final)
  # Reference: prelude, then the first loop's depths by hand, then norm + head (no coda).
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  tok = Tokens(positions=idx, segments=jnp.ones((B, T), jnp.int32), indices=idx)
  h, _ = model.prelude(model.embed(x), tok)
  core = model.core
  for depth, j in enumerate(core.plan.order[:core.plan.num_shared]):
    h = core.blocks[j](h, tok, core.lora.at(depth),
                       (core.attn_norms[depth], core.ffn_norms[depth]))
  np.testing.assert_allclose(exits[0], model.logits(h), atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(exits[0] - exits[1]))) > 1e-2


@pytest.mark.parametrize("loss,n,want", [
  ("weighted", 2, (1 / 3, 2 / 3)),
  ("weighted", 3, (1 / 6, 1 / 3, 1 / 2)),
  ("aggressive", 2, (0.1, 1.0)),
  ("aggressive", 3, (0.1, 0.1, 1.0)),
  ("final", 3, (0.0, 0.0, 1.0)),
])
def test_exit_weights(loss, n, want):
  np.testing.assert_allclose(step.Objective(exits=True, exit_loss=loss).exit_weights(n), want)


class FixedLogits(nnx.Module):
  """A stand-in model whose exit logits are its parameters (to differentiate the objective)."""

  def __init__(self, logits_EBTV):
    self.logits_EBTV = nnx.Param(logits_EBTV)

  def __call__(self, inputs, positions, segments, exits=False):
    del inputs, positions, segments
    logits = list(self.logits_EBTV[...])
    return (logits if exits else logits[-1]), {}, None  # (logits, aux, cache) as LanguageModel


def batch_and_logits(num_exits=2, vocab=11):
  keys = jax.random.split(jax.random.key(3), 3)
  seg = jnp.ones((B, T + 1), jnp.int32).at[0, 5:].set(2).at[2, -2:].set(0)  # packed + padding
  batch = dict(tokens=jax.random.randint(keys[0], (B, T + 1), 0, vocab),
               positions=jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1)), segment_ids=seg)
  return batch, 3.0 * jax.random.normal(keys[1], (num_exits, B, T, vocab))


def ce_sums(logits_EBTV, batch):
  _, _, _, targets, mask = step.lm_inputs(batch)
  return [jnp.sum(optax.softmax_cross_entropy_with_integer_labels(lg, targets) * mask)
          for lg in logits_EBTV]


def test_weighted_and_aggressive_objectives_by_hand():
  batch, logits = batch_and_logits(num_exits=3)
  ce = ce_sums(logits, batch)
  model = FixedLogits(logits)
  total, sums, count, _ = step.objective_sums(
      model, batch, step.Objective(exits=True, exit_loss="weighted"))
  np.testing.assert_allclose(total, (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6, rtol=1e-6)
  np.testing.assert_allclose([sums[f"nll/exit_{e}"] for e in (1, 2, 3)], ce, rtol=1e-6)
  assert int(count) == int(jnp.sum(step.lm_inputs(batch)[-1]))

  _, _, _, _, mask = step.lm_inputs(batch)
  p = jax.nn.softmax(logits[-1])
  kl = [jnp.sum(jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(lg)), -1) * mask)
        for lg in logits[:-1]]
  total, sums, _, _ = step.objective_sums(
      model, batch, step.Objective(exits=True, exit_loss="aggressive", exit_kd_coeff=0.5))
  np.testing.assert_allclose(
      total, ce[2] + 0.1 * (ce[0] + ce[1]) + 0.5 * (kl[0] + kl[1]), rtol=1e-5)
  np.testing.assert_allclose([sums["kd/exit_1"], sums["kd/exit_2"]], kl, rtol=1e-5)


def test_intermediate_kd_sends_no_gradient_into_the_final_output():
  batch, logits = batch_and_logits()
  objective = step.Objective(exits=True, exit_loss="aggressive", exit_coeff=0.0,
                             exit_kd_coeff=1.0)

  def grad(obj):
    def loss(lg):
      return step.objective_sums(FixedLogits(lg), batch, obj)[0]
    return jax.grad(loss)(logits)

  with_kd, final_only = grad(objective), grad(step.Objective())
  np.testing.assert_allclose(with_kd[1], final_only[1], atol=1e-7)  # final exit: CE only
  assert float(jnp.max(jnp.abs(with_kd[0]))) > 1e-3  # the intermediate exit learns from KD
  np.testing.assert_array_equal(final_only[0], 0.0)


def test_distillation_from_an_identical_teacher_adds_nothing():
  """KL(p_teacher || p_student) is 0 when the teacher is the student, and the gradient equals
  the plain CE gradient; with another teacher it is the KL computed by hand."""
  cfg = tiny_config()
  student, other = new_model(cfg), new_model(cfg, seed=5)
  batch = dict(tokens=jax.random.randint(jax.random.key(0), (B, T + 1), 0, 64),
               positions=jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1)),
               segment_ids=jnp.ones((B, T + 1), jnp.int32))
  distill = step.Objective(distill_coeff=2.0)

  def grads(teacher, objective):
    def loss(params):
      model = nnx.merge(nnx.graphdef(student), params)
      return step.objective_sums(model, batch, objective, teacher)[0]
    return jax.grad(loss)(nnx.state(student, nnx.Param))

  _, sums, _, _ = step.objective_sums(student, batch, distill, student)
  assert abs(float(sums["distill_kl"])) < 1e-5
  same = grads(student, distill)
  plain = grads(None, step.Objective())
  for g, want in zip(jax.tree.leaves(same), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(g, want, atol=1e-6)

  total, sums, _, _ = step.objective_sums(student, batch, distill, other)
  inputs, positions, segments, _, mask = step.lm_inputs(batch)
  p = jax.nn.softmax(other(inputs, positions, segments)[0])
  log_q = jax.nn.log_softmax(student(inputs, positions, segments)[0])
  kl = jnp.sum(jnp.sum(p * (jnp.log(p) - log_q), -1) * mask)
  np.testing.assert_allclose(sums["distill_kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(total, sums["nll"] + 2.0 * kl, rtol=1e-6)


@pytest.mark.parametrize("key,value,needle", [
  ("model.recursion.early_exit", True, "config.model.recursion.early_exit=True: one exit per"),
  ("model.recursion.lora_merged", True, "config.model.recursion.lora_merged=True: merges"),
  ("train.exit_loss", "weighted", "config.train.exit_loss='weighted': needs config.model"),
  ("train.exit_loss", "mean", "config.train.exit_loss='mean': must be one of"),
  ("train.distill.coeff", 1.0, "config.train.distill.teacher='': distillation needs a teacher"),
  ("train.exit_coeff", -1.0, "config.train.exit_coeff=-1.0: must be >= 0"),
])
def test_config_errors_name_the_key(key, value, needle):
  c = base.get_config()
  c.model.recursion.update(strategy="sequence", num_recursions=2)
  section, *rest = key.split(".")
  target = c[section]
  for part in rest[:-1]:
    target = target[part]
  target[rest[-1]] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert needle in str(e.value)


def test_launcher_distils_and_reports_every_exit(tiny, tmp_path):  # noqa: F811
  """Converted at full rank with untied norms the student is its teacher: the distillation KL
  of the first step is ~0; training with the aggressive exit loss reports NLL per exit."""
  path, _, _ = tiny
  launcher = launch_util.Launcher(tmp_path / "shared", config="configs/rrt.py:tiny")
  overrides = {"model.init_from": path, "model.num_layers": TINY["num_hidden_layers"],
               "model.recursion.lora_rank": 1000, "model.recursion.share_norms": False,
               "model.recursion.early_exit": True, "train.exit_loss": "aggressive",
               "train.distill.coeff": 1.0, "train.steps": 2, "train.warmup_steps": 2,
               "model.compute_dtype": "float32"}
  result = launcher.run(tmp_path / "run", overrides)
  assert result.returncode == 0, result.stderr[-2000:]
  train = [r for r in result.metrics if r["kind"] == "train"]
  assert abs(train[0]["distill_kl"]) < 1e-4, train[0]
  assert train[0]["kd/exit_1"] > 1e-3  # the first loop's exit is not the final output
  assert "per exit" in result.stdout
  valid = [r for r in result.metrics if r["kind"] == "valid"]
  assert valid and valid[-1]["nll/exit_2"] == pytest.approx(valid[-1]["nll"])
