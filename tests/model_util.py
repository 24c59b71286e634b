"""Small configs, and a train state with its jitted step, shared by the tests."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from configs import base
from research import config as config_lib
from research.infer import decode
from research.model.lm import LanguageModel
from research.train import optimizer
from research.train import step as step_lib


def tiny_config(**model) -> mlc.ConfigDict:
  """A validated config with a tiny model (d=32, 2 layers, GQA 4/2, vocab 64), fp32 compute."""
  c = base.get_config()
  c.model.update(dict(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                           compute_dtype="float32"), **model))
  c.data.seq_len = 16
  c.train.update(batch_size=4, steps=10, grad_accum=1)
  # exact token choice: 2 step sizes, not the default 8 (each one a compiled branch; 8 make a
  # token-choice train step compile 7x longer). tests/test_mor.py checks 4 and 1.
  c.model.mor.token.exact_buckets = 2
  config_lib.validate(c)
  return config_lib.with_derived(c, 64)


def with_mor(cfg: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
  """cfg with the dotted keys under model.mor set (e.g. {"token.balancing": "loss_free"}),
  validated."""
  for key, value in overrides.items():
    node = cfg.model.mor
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(cfg)
  return cfg


def init_state(cfg: mlc.ConfigDict, tx) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, train state) of cfg's seed-0 model and the optimizer `tx`."""
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  state = dict(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32), params=params,
               other=other, opt=tx.init(params))
  return graphdef, state


def train_setup(cfg: mlc.ConfigDict, steps: int, policy: str = "stop"
                ) -> tuple[dict, Callable]:
  """(initial state, jitted train step) with cfg's optimizer and schedule over `steps`, no
  gradient accumulation, non-finite `policy`."""
  tx = optimizer.make_optimizer(cfg.train, steps)
  graphdef, state = init_state(cfg, tx)
  schedule = optimizer.make_schedule(cfg.train, steps)
  return state, jax.jit(step_lib.make_train_step(graphdef, tx, schedule, 1, policy))


def prefill_then_decode(model: LanguageModel, tokens_BT: jax.Array, prompt: int) -> jax.Array:
  """Logits [B, T, V] of research/infer: prefill of the first `prompt` tokens, then one
  decode_step per remaining token (to compare with the full forward)."""
  b, t = tokens_BT.shape
  logits, cache = decode.prefill(model, tokens_BT[:, :prompt], decode.init_cache(model, b, t))
  got = [logits]
  for i in range(prompt, t):
    logits_BV, cache = decode.decode_step(model, tokens_BT[:, i], cache)
    got.append(logits_BV[:, None])
  return jnp.concatenate(got, axis=1)


def random_batch(b: int = 4, t: int = 16, vocab: int = 64) -> dict[str, jax.Array]:
  """b rows of t + 1 seeded random tokens, one document per row."""
  tokens = np.random.default_rng(0).integers(0, vocab, (b, t + 1)).astype(np.int32)
  pos = np.broadcast_to(np.arange(t + 1, dtype=np.int32), (b, t + 1))
  return {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(pos),
          "segment_ids": jnp.ones((b, t + 1), jnp.int32)}


def fit(state: dict, train_step: Callable, batch: dict, steps: int
        ) -> tuple[dict, dict, list[float]]:
  """`steps` train steps on one batch: (state, last step's metrics, the losses)."""
  losses = []
  for _ in range(steps):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, metrics, losses


def assert_decodes_like_forward(cfg: mlc.ConfigDict, *, prompt: int = 5, t: int = 12) -> None:
  """cfg's seed-0 model gives the same logits from prefill_then_decode as from its full forward
  on 2 random rows of t tokens."""
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  tokens_BT = jax.random.randint(jax.random.key(1), (2, t), 0, cfg.model.vocab_size)
  want, _, _ = nnx.jit(lambda m, x: m(x))(model, tokens_BT)
  np.testing.assert_allclose(prefill_then_decode(model, tokens_BT, prompt), want, atol=5e-5,
                             rtol=1e-5)
