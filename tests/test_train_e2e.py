"""The README's first command, as a new user runs it: tiny pretraining on the embedded corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import mor
from research.data import corpus, tokenizer
from tests import launch_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unigram_cross_entropy(cache_dir: str) -> float:
  """NLL (nats/token) of the validation split under the train split's unigram distribution."""
  cfg = mor.get_config("tiny")
  train, valid = corpus.load_split(cfg.data, cache_dir)
  tok = tokenizer.get_tokenizer(cfg.data, cache_dir, train)
  counts = np.ones(tok.get_vocab_size())  # add-one smoothing
  for enc in tok.encode_batch(list(train)):
    np.add.at(counts, enc.ids, 1)
  valid_ids = np.concatenate([enc.ids for enc in tok.encode_batch(list(valid))])
  return float(-np.log(counts[valid_ids] / counts.sum()).mean())


@pytest.mark.slow
def test_tiny_mor_pretraining_beats_the_unigram_model(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/mor.py:tiny", f"--workdir={workdir}",
       "--config.wandb.mode=disabled", "--config.train.progress=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=1200,
      env=launch_util.user_env())  # not the tests' -O0
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "validation nll" in proc.stdout
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  final = [r for r in records if r["kind"] == "valid" and r["step"] == 300]
  assert final, records[-3:]
  unigram = unigram_cross_entropy(str(workdir / "cache"))
  assert final[-1]["nll"] < unigram - 0.5, (final[-1]["nll"], unigram)
  train = [r for r in records if r["kind"] == "train"]
  assert all(np.isfinite(r["loss"]) and 0 < r["mfu"] < 1 for r in train)
  depth = np.asarray(train[-1]["mor/depth_frac"])  # tokens leaving after 0..Nr recursions
  assert depth.sum() == 1.0 and depth[-1] > 0.2  # capacities 1, 2/3, 1/3 at T=128
