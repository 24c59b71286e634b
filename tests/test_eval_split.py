"""Issue 15 item 16: train.eval_batches=-1 scores the whole validation split exactly once, and a
count that would wrap around the split is refused."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from research import config as config_lib
from research.data import pipeline, tokenizer
from research.train import loop
from research.train import mesh as mesh_lib

DOCS = [f"Document {i}: " + " ".join(f"w{(i * 5 + j) % 17}" for j in range(i % 13 + 4))
        for i in range(30)]


def scored(batch: dict) -> np.ndarray:
  """The target mask of step.lm_inputs."""
  seg = np.asarray(batch["segment_ids"])
  return (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)


@pytest.fixture(scope="module")
def run():
  cfg = base.get_config()
  cfg.data.seq_len, cfg.train.batch_size, cfg.data.num_threads = 8, 4, 1
  tok = tokenizer.train_bpe(DOCS, 300)
  return types.SimpleNamespace(cfg=cfg, tokenizer=tok, valid_docs=DOCS,
                               mesh=mesh_lib.make_mesh(cfg.mesh))


def count_step(state, batch):
  mask = jnp.asarray(scored(batch))
  return {"nll": jnp.sum(mask) * 1.0}, jnp.sum(mask)


def test_minus_one_scores_every_target_of_the_split_once(run):
  one_pass = pipeline.make_dataset(DOCS, run.tokenizer, seq_len=8, batch_size=4, seed=0,
                                   shuffle=False, repeat=False, drop_remainder=False)
  batches = list(one_pass)
  want = sum(int(scored(b).sum()) for b in batches)
  run.cfg.train.eval_batches = -1
  result = loop.evaluate(run, count_step, None)
  assert result["targets"] == want and result["batches"] == len(batches)
  assert batches[-1]["tokens"].shape[0] < 4  # the last batch was short: it was padded
  fit = loop.valid_batches(run)
  assert fit == len(batches) - 1  # the full ones
  run.cfg.train.eval_batches = fit
  loop.check_eval_batches(run)
  assert loop.evaluate(run, count_step, None)["batches"] == fit
  run.cfg.train.eval_batches = fit + 1
  with pytest.raises(config_lib.ConfigError, match=rf"eval_batches={fit + 1}: the validation "
                     rf"split \(30 documents\) holds only {fit} batches of 4 rows"):
    loop.check_eval_batches(run)
