"""The grain pipeline: documents -> tokens + EOS -> packed rows of T+1 tokens -> batches.

Batches are dicts of int32 numpy arrays of shape [batch_size, seq_len + 1]:
  tokens       token ids; the trainer uses tokens[:, :-1] as inputs and tokens[:, 1:] as targets
  positions    position within the piece of a document in this row (restarts at 0 at each new
               document and at the start of every row)
  segment_ids  1, 2, ... numbers the document pieces of a row; 0 marks padding (only at the end of
               a finite, non-repeated dataset)
"""

from collections.abc import Sequence

import grain
import numpy as np
from tokenizers import Tokenizer

from research.data import tokenizer as tokenizer_lib


def _plain_text_tokenizer(tokenizer_json: str) -> Tokenizer:
  """A tokenizer that encodes special-token strings found in text as ordinary text."""
  tok = Tokenizer.from_str(tokenizer_json)
  tok.encode_special_tokens = True
  return tok


class Tokenize(grain.transforms.Map):
  """text -> {"tokens": int32 ids + EOS}. Text that spells a special token stays plain text."""

  def __init__(self, tok: Tokenizer):
    self.tokenizer_json = tok.to_str()
    self.eos = tokenizer_lib.eos_id(tok)
    self._tok = None

  def __getstate__(self) -> dict:
    return {"tokenizer_json": self.tokenizer_json, "eos": self.eos, "_tok": None}

  def map(self, text: str) -> dict[str, np.ndarray]:
    if self._tok is None:
      self._tok = _plain_text_tokenizer(self.tokenizer_json)
    ids = self._tok.encode(text, add_special_tokens=False).ids
    ids.append(self.eos)
    return {"tokens": np.asarray(ids, dtype=np.int32)}


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packing outputs to tokens / positions / segment_ids (int32)."""
  return {
    "tokens": packed["tokens"].astype(np.int32),
    "positions": packed["tokens_positions"].astype(np.int32),
    "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
  }


def make_dataset(
  docs: Sequence[str],
  tok: Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  shuffle: bool,
  repeat: bool,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  prefetch: int = 8,
  worker_count: int = 0,
) -> grain.IterDataset:
  """Packed LM batches of this host's shard of `docs`; `iter()` gives a checkpointable iterator.

  worker_count > 0 runs the pipeline in grain worker processes: absl flags must be parsed (as under
  absl.app.run) and the caller needs an `if __name__ == "__main__":` guard.
  """
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.seed(seed).shuffle()  # a new permutation every epoch
  if repeat:
    ds = ds.repeat(None)
  ds = ds[process_index::process_count].map(Tokenize(tok))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
  it = it.batch(batch_size, drop_remainder=True).map(to_batch)
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def count_tokens(docs: Sequence[str], tok: Tokenizer, chunk: int = 256) -> int:
  """Tokens in `docs`, counting the EOS appended to each document."""
  tok = _plain_text_tokenizer(tok.to_str())
  total = 0
  for start in range(0, len(docs), chunk):
    batch = [docs[i] for i in range(start, min(start + chunk, len(docs)))]
    total += sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))
  return total
