"""The grain pipeline: documents -> tokens + EOS -> packed rows of T+1 tokens -> batches.

Batches are dicts of int32 numpy arrays of shape [batch_size, seq_len + 1]:
  tokens       token ids; the trainer uses tokens[:, :-1] as inputs and tokens[:, 1:] as targets
  positions    position within the piece of a document in this row (restarts at 0 at each new
               document and at the start of every row); positions="row": 0..T along the row
  segment_ids  1, 2, ... numbers the document pieces of a row; 0 marks padding (only at the end of
               a finite, non-repeated dataset); score_boundary_targets: 1 for the whole row
"""

from collections.abc import Sequence
from typing import Any

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


POSITIONS = ("document", "row")
ROW_LENGTHS = ("T+1", "T")  # tokens packed per row: T inputs and T targets | T inputs, T-1 targets


class ToBatch(grain.transforms.Map):
  """Renames grain's packing outputs to tokens / positions / segment_ids (int32).

  positions="row": 0, 1, ... along the whole row (not restarting at documents);
  one_segment: every non-padding token in segment 1, so the target after a document's EOS is
  scored too (with attention across documents, the model sees no other difference).
  """

  def __init__(self, positions: str = "document", one_segment: bool = False,
               pad_column: bool = False):
    if positions not in POSITIONS:
      raise ValueError(f"positions={positions!r}: expected one of {POSITIONS}")
    self.positions, self.one_segment, self.pad_column = positions, one_segment, pad_column

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = {"tokens": packed["tokens"].astype(np.int32),
             "positions": packed["tokens_positions"].astype(np.int32),
             "segment_ids": packed["tokens_segment_ids"].astype(np.int32)}
    if self.pad_column:  # rows of T tokens: a padding column makes them T + 1 wide
      batch = {k: np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.int32)], axis=-1)
               for k, v in batch.items()}
    segments = batch["segment_ids"]
    if self.positions == "row":
      positions = np.broadcast_to(np.arange(segments.shape[-1], dtype=np.int32), segments.shape)
      batch["positions"] = np.where(segments != 0, positions, 0).astype(np.int32)
    if self.one_segment:
      batch["segment_ids"] = (segments != 0).astype(np.int32)
    return batch


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ToBatch() of the default settings (positions restart at documents, one segment each)."""
  return ToBatch().map(packed)


TUPLE_TAG = "__tuple__"  # a tuple in an iterator state, as JSON: {"__tuple__": [items]}
TYPED_STATE = "typed_state"  # key of the encoded state in TypedStateIterator.get_state()


def encode_state(state: Any) -> Any:
  """`state` as JSON-able values that keep their types: tuples become {"__tuple__": [...]}."""
  if isinstance(state, tuple):
    return {TUPLE_TAG: [encode_state(x) for x in state]}
  if isinstance(state, list):
    return [encode_state(x) for x in state]
  if isinstance(state, dict):
    return {k: encode_state(v) for k, v in state.items()}
  return state


def decode_state(state: Any) -> Any:
  """Inverse of encode_state (after a JSON round trip)."""
  if isinstance(state, dict):
    if set(state) == {TUPLE_TAG}:
      return tuple(decode_state(x) for x in state[TUPLE_TAG])
    return {k: decode_state(v) for k, v in state.items()}
  if isinstance(state, list):
    return [decode_state(x) for x in state]
  return state


def _legacy_state(state: Any) -> Any:
  """A state saved before TypedStateIterator (plain JSON): the packer's slices were tuples."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in sub.items()} if k == "remainder_slices"
                else _legacy_state(sub)) for k, sub in state.items()}
  if isinstance(state, list):
    return [_legacy_state(x) for x in state]
  return state


class TypedStateIterator(grain.DatasetIterator):
  """Delegates to `parent`, with a state whose JSON round trip gives back the same types.

  grain's packer tells "no leftover tokens" by `slices != (-1, -1)`; a plain JSON round trip
  makes that tuple a list, and the restored packer pulls one document too many.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {TYPED_STATE: encode_state(self._parent.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    if TYPED_STATE in state:
      self._parent.set_state(decode_state(state[TYPED_STATE]))
    else:
      self._parent.set_state(_legacy_state(state))


class TypedStateIterDataset(grain.IterDataset):
  """`parent` whose iterators are TypedStateIterators."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> TypedStateIterator:
    return TypedStateIterator(self._parent.__iter__())


def is_document(doc: str | None) -> bool:
  """False for the None a reader gives for a skipped bad record."""
  return doc is not None


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
  skip_bad_records: bool = False,
  positions: str = "document",
  score_boundary_targets: bool = False,
  row_length: str = "T+1",
  drop_remainder: bool = True,
  shuffle_window: int = 0,
) -> grain.IterDataset:
  """Packed LM batches of this host's shard of `docs`; `iter()` gives a checkpointable iterator
  whose state survives a JSON round trip exactly (TypedStateIterator).

  worker_count > 0 runs the pipeline in grain worker processes: absl flags must be parsed (as under
  absl.app.run) and the caller needs an `if __name__ == "__main__":` guard. `skip_bad_records`
  drops the documents a reader gives as None (readers.open_documents with skip_bad).
  `positions`, `score_boundary_targets` and `row_length` (docs/data.md): see ToBatch; batches
  are [batch_size, seq_len + 1] either way. `drop_remainder=False`
  (with repeat=False) keeps the last, smaller batch. `shuffle_window` > 0 (with shuffle) permutes
  the packed rows in consecutive windows of that many rows, so a batch mixes documents instead of
  holding consecutive rows of one long document (docs/data.md "Shuffling").
  """
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.seed(seed).shuffle()  # a new permutation every epoch
  if repeat:
    ds = ds.repeat(None)
  ds = ds[process_index::process_count]
  if skip_bad_records:
    ds = ds.filter(is_document)
  ds = ds.map(Tokenize(tok))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if row_length not in ROW_LENGTHS:
    raise ValueError(f"row_length={row_length!r}: expected one of {ROW_LENGTHS}")
  row = seq_len + 1 if row_length == "T+1" else seq_len
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": row})
  if shuffle and shuffle_window > 0:
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed)
  it = it.batch(batch_size, drop_remainder=drop_remainder).map(
      ToBatch(positions, one_segment=score_boundary_targets, pad_column=row_length == "T"))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return TypedStateIterDataset(it)


def count_tokens(docs: Sequence[str], tok: Tokenizer, chunk: int = 256) -> int:
  """Tokens in `docs`, counting the EOS appended to each document."""
  tok = _plain_text_tokenizer(tok.to_str())
  total = 0
  for start in range(0, len(docs), chunk):
    batch = [docs[i] for i in range(start, min(start + chunk, len(docs)))]
    batch = [d for d in batch if d is not None]  # bad records skipped by the reader
    total += sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))
  return total
