"""What the benchmarks share: a synthetic batch and the process's CPU time."""

import resource

import ml_collections as mlc
import numpy as np


def synthetic_batch(cfg: mlc.ConfigDict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random tokens [B, T + 1]; every row is one document (full causal attention)."""
  b, t = cfg.train.batch_size, cfg.data.seq_len + 1
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((b, t), np.int32)}


def cpu_seconds() -> float:
  """CPU time of this process, all threads (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime
