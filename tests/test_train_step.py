"""The train step and optimizer against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.train import optimizer, step
from tests.model_util import init_state, tiny_config, train_setup


def make_batch(b=4, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t + 1), np.int32)
  seg[:, 9:] = 2  # a second document starts at index 9 of every row
  pos = np.concatenate([np.arange(9), np.arange(t + 1 - 9)])[None].repeat(b, 0).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(pos),
          "segment_ids": jnp.asarray(seg)}


def test_loss_mask_skips_document_boundaries_and_padding():
  batch = make_batch()
  *_, mask = step.lm_inputs(batch)
  assert mask.shape == (4, 16)
  assert not bool(mask[:, 8].any())  # target at 9 is the first token of document 2
  assert int(mask.sum()) == 4 * 15
  batch["segment_ids"] = batch["segment_ids"].at[:, 12:].set(0)  # padding
  assert int(step.lm_inputs(batch)[-1].sum()) == 4 * (15 - 5)


def test_nll_sum_equals_manual_cross_entropy():
  cfg = tiny_config()
  graphdef, state = init_state(cfg, optax.sgd(0.0))
  model = nnx.merge(graphdef, state["params"], state["other"])
  batch = make_batch()
  total, count, _ = step.nll_sum(model, batch)
  inputs, pos, seg, targets, mask = step.lm_inputs(batch)
  logits, _, _ = model(inputs, pos, seg)
  logp = jax.nn.log_softmax(logits, -1)
  manual = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(total, jnp.sum(manual * mask), rtol=1e-5)
  assert int(count) == int(mask.sum())


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(accum):
  cfg = tiny_config()
  tx = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify rounding)
  sched = optimizer.make_schedule(cfg.train, 10)
  graphdef, state = init_state(cfg, tx)
  batch = make_batch()
  batch["segment_ids"] = batch["segment_ids"].at[0, 12:].set(0)  # unequal targets per micro
  one = jax.jit(step.make_train_step(graphdef, tx, sched, 1, "stop"))
  many = jax.jit(step.make_train_step(graphdef, tx, sched, accum, "stop"))
  s1, m1 = one(state, batch)
  s2, m2 = many(state, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_training_reduces_loss_on_a_fixed_batch():
  cfg = tiny_config()
  cfg.train.lr, cfg.train.warmup_steps = 1e-2, 0
  state, train_step = train_setup(cfg, 30)
  batch = make_batch()
  losses = []
  for _ in range(30):
    state, m = train_step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state["step"]) == 30


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_step_never_reaches_the_state(policy):
  cfg = tiny_config()
  tx = optimizer.make_optimizer(cfg.train, 10)
  graphdef, state = init_state(cfg, tx)
  train_step = jax.jit(step.make_train_step(graphdef, tx, optimizer.make_schedule(cfg.train, 10),
                                            1, policy))
  state = dict(state, step=jnp.ones((), jnp.int32))
  poisoned = jax.tree.map(lambda x: x, state)
  emb = poisoned["params"]["embed"]["embedding"]
  emb.set_value(emb[...].at[0, 0].set(jnp.nan))
  before = jax.tree.map(np.asarray, poisoned)
  after, m = train_step(poisoned, make_batch())
  assert not bool(m["finite"]) and int(m["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(before["opt"]), jax.tree.leaves(after["opt"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(after["step"]) == (2 if policy == "skip" else 1)
  if policy == "stop":  # frozen: a later finite batch does not move it either
    later, _ = train_step(after, make_batch(seed=1))
    assert int(later["step"]) == 1 and int(later["skipped"]) == 2


def test_weight_decay_skips_vectors():
  cfg = tiny_config()
  _, state = init_state(cfg, optax.sgd(0.0))
  mask = optimizer.decay_mask(state["params"])
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert all(not v for k, v in flat.items() if "scale" in k)
  assert all(v for k, v in flat.items() if "kernel" in k or "embedding" in k)


def test_wsd_and_cosine_schedules():
  cfg = tiny_config()
  t = cfg.train
  t.lr, t.warmup_fraction, t.decay_fraction, t.min_lr_ratio = 1.0, 0.1, 0.2, 0.0
  wsd = optimizer.make_schedule(t, 100)
  assert float(wsd(0)) == 0.0 and float(wsd(5)) == pytest.approx(0.5)
  assert float(wsd(10)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)
  t.schedule, t.min_lr_ratio = "cosine", 0.1
  cos = optimizer.make_schedule(t, 100)
  assert float(cos(10)) == pytest.approx(1.0)
  assert float(cos(55)) == pytest.approx(0.55, abs=1e-3)
  assert float(cos(100)) == pytest.approx(0.1)


def test_wsd_lengths_round_like_the_released_mor_configs():
  cfg = tiny_config()
  t = cfg.train
  t.warmup_fraction, t.decay_fraction = 0.05, 0.2
  assert optimizer.warmup_steps(t, 1716) == 86  # MoR-3 at 2e18 (mor.md §4.2)
  t.lr, t.min_lr_ratio = 1.0, 0.0
  sched = optimizer.make_schedule(t, 9438)  # vanilla 360M at 16.5e18: decay over 1888 steps
  assert float(sched(9438 - 1888)) == pytest.approx(1.0)
  assert float(sched(9438 - 1887)) < 1.0


def test_an_update_that_overflows_the_weights_is_rejected():
  cfg = tiny_config()
  tx = optax.sgd(1e39)  # overflows float32: finite loss and gradient, non-finite weights
  graphdef, state = init_state(cfg, tx)
  train_step = jax.jit(step.make_train_step(graphdef, tx, optimizer.make_schedule(cfg.train, 10),
                                            1, "stop"))
  with pytest.warns(RuntimeWarning, match="overflow encountered in cast"):  # 1e39 -> float32
    after, m = train_step(state, make_batch())
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert not bool(m["finite"])
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(after["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
