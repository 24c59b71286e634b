"""Reading a run's workdir for notebooks: metrics.jsonl records and the saved config."""

import json
import os

import numpy as np


def load_metrics(workdir: str) -> dict[str, list[dict]]:
  """Records of <workdir>/metrics.jsonl grouped by kind ("train", "valid")."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no metrics; was a run started in {workdir}?")
  runs: dict[str, list[dict]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        runs.setdefault(record["kind"], []).append(record)
  return runs


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the records that have it."""
  pairs = [(r["step"], r[key]) for r in records if key in r]
  steps, values = zip(*pairs, strict=True) if pairs else ((), ())
  return np.asarray(steps), np.asarray(values, dtype=float)


def load_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)
