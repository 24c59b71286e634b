"""Confidence-based early exit in decoding (research/model/early_exit.py, RRT §2.4).

A tiny cycle model with Nr = 3 and one exit per loop (d = 32, vocab 64, T = 12). Decoding equals
the full forward for this core in test_decode.py ("cycle_early_exit_lora"); the depth-wise
engine serves it in test_engine.py ("exit_relaxed").
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.model import early_exit
from research.model.lm import LanguageModel
from tests.model_util import tiny_config

TAU = 0.0284  # about the median loop-1 exit confidence of the seed-0 model (checked below)


def config(tau: float, **recursion):
  cfg = tiny_config(num_layers=3, vocab_size=64)
  cfg.model.recursion.update(dict(strategy="cycle", num_recursions=3, early_exit=True,
                                  exit_threshold=tau, **recursion))
  config_lib.validate(cfg)
  return cfg


@functools.cache
def build(tau: float) -> LanguageModel:
  with nnx.use_eager_sharding(False):
    return LanguageModel(config(tau).model, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model: LanguageModel, tokens_BT):
  """(routed logits, depth, every loop's exit logits of the unrouted model)."""
  logits_BTV, aux, _ = model(tokens_BT)
  exits, _, _ = model(tokens_BT, exits=True)
  return logits_BTV, aux.get("route/depth"), exits


def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def test_threshold_one_is_the_plain_recursive_model_bit_for_bit():
  """No max softmax probability reaches 1 here, so every token runs every loop."""
  got, depth, _ = forward(build(1.0), tokens())
  want, none, _ = forward(build(0.0), tokens())
  assert none is None and build(0.0).core.rule is None
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(depth) == 3).all()


def test_a_token_exits_at_the_first_loop_whose_exit_is_confident():
  """Depth 1 iff loop 1's exit confidence >= tau, and then the token's logits are that exit's
  (loop 1 runs on every token, so its state is the unrouted model's); a token that goes on has
  its later loops' attention over the tokens still in, so only loop 1 is compared."""
  logits, depth, exits = forward(build(TAU), tokens())
  depth, conf1 = np.asarray(depth), np.asarray(early_exit.confidence(exits[0]))
  assert (depth == 1).any() and (depth == 3).any()
  np.testing.assert_array_equal(depth == 1, conf1 >= TAU)
  np.testing.assert_allclose(np.asarray(logits)[depth == 1], np.asarray(exits[0])[depth == 1],
                             atol=1e-6)


def test_confidence_is_the_max_softmax_probability():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 7))
  np.testing.assert_allclose(np.asarray(early_exit.confidence(logits)),
                             np.asarray(jax.nn.softmax(logits).max(-1)), rtol=1e-6)


@pytest.mark.parametrize("overrides, why", [
    (dict(exit_threshold=1.5), r"exit_threshold=1\.5: must be in \[0, 1\]"),
    (dict(exit_threshold=0.5, early_exit=False), "needs config.model.recursion.early_exit"),
    (dict(exit_threshold=0.5, strategy="middle_cycle"), "strategy='cycle'"),
])
def test_bad_thresholds_are_refused_naming_the_key(overrides, why):
  cfg = tiny_config(num_layers=5, vocab_size=64)
  cfg.model.recursion.update(dict(dict(strategy="cycle", num_recursions=3, early_exit=True),
                                  **overrides))
  if overrides.get("strategy") != "middle_cycle":
    cfg.model.num_layers = 3
  with pytest.raises(config_lib.ConfigError, match=why):
    config_lib.validate(cfg)
