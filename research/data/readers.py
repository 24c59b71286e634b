"""Random-access document readers for corpora a user brings: jsonl, parquet and ArrayRecord.

Each reader is a picklable `Sequence[str]` usable as `grain.MapDataset.source`. It keeps only a
small index in memory and reads a document when it is asked for, so multi-GB corpora are fine.
`fingerprint` identifies the files cheaply (names, sizes, document counts) without hashing text.
"""

import collections
import glob
import hashlib
import json
import os
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from array_record.python import array_record_data_source, array_record_module

_CHUNK_BYTES = 64 << 20  # jsonl indexing reads this much at a time
_ROW_GROUP_CACHE = 4  # decoded parquet row groups kept per process
SAMPLE_RECORDS = 32  # records of every file read at set-up (first, last, evenly spaced)


class BadRecordError(ValueError):
  """A record that is not a document (malformed JSON, no text field, not text); names the file
  and line or record."""


class _BadRecords:
  """With `skip_bad`, a bad record reads as None (the pipeline drops it) and is counted."""

  skip_bad = False

  def _init_bad_records(self, skip_bad: bool) -> None:
    self.skip_bad, self.bad_records = skip_bad, 0
    self._bad_lock = threading.Lock()

  def _bad(self, e: BadRecordError) -> None:
    if not self.skip_bad:
      raise e
    with self._bad_lock:
      self.bad_records += 1
    logging.warning("skipping %s (config.data.skip_bad_records=True)", e)

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock", "_bad_lock")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._bad_lock = threading.Lock()


def _sample(n: int) -> list[int]:
  """Up to SAMPLE_RECORDS indices of [0, n): the first, the last and evenly spaced ones."""
  return sorted({int(i) for i in np.linspace(0, n - 1, min(n, SAMPLE_RECORDS))})


def expand_glob(pattern: str) -> list[str]:
  """Sorted files matching `pattern`; ValueError if none."""
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
  if not files:
    raise ValueError(f"The glob {pattern!r} matches no files.")
  return files


def _fingerprint(kind: str, text_key: str, files: Sequence[str], counts: Sequence[int]) -> str:
  pairs = zip(files, counts, strict=True)
  entries = [[os.path.basename(f), os.path.getsize(f), int(n)] for f, n in pairs]
  blob = json.dumps([kind, text_key, entries])
  return hashlib.sha256(blob.encode()).hexdigest()


def _text_of(record: object, key: str, where: str) -> str:
  if not isinstance(record, dict) or key not in record:
    raise BadRecordError(f"{where}: the record has no text key {key!r}.")
  if not isinstance(record[key], str):
    raise BadRecordError(f"{where}: {key!r} holds {type(record[key]).__name__}, not a string.")
  return record[key]


def _check_index(i: int, n: int) -> int:
  """`i` as an index in [0, n) (negative counts from the end); IndexError otherwise."""
  if not -n <= i < n:
    raise IndexError(f"document index {i} out of range for {n} documents")
  return i % n


class Subset(Sequence):
  """A view of `docs` at `indices` (a held-out split without copying the corpus)."""

  def __init__(self, docs: Sequence[str], indices: np.ndarray):
    self.docs = docs
    self.indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> str | None:
    return self.docs[int(self.indices[i])]

  @property
  def bad_records(self) -> int:
    return getattr(self.docs, "bad_records", 0)

  @property
  def fingerprint(self) -> str | None:
    parent = getattr(self.docs, "fingerprint", None)
    if parent is None:
      return None
    return hashlib.sha256(parent.encode() + self.indices.tobytes()).hexdigest()


class _Located(Sequence):
  """Documents spread over files: global index -> (file, local index) by a cumulative count."""

  files: list[str]
  ends: np.ndarray  # ends[k] = number of documents in files[:k + 1] (or row groups)

  def __len__(self) -> int:
    return int(self.ends[-1])

  def _locate(self, i: int) -> tuple[int, int]:
    i = _check_index(i, len(self))
    k = int(np.searchsorted(self.ends, i, side="right"))
    return k, i - (int(self.ends[k - 1]) if k else 0)


class JsonlDocuments(_BadRecords, _Located):
  """One JSON object per line; the text is field `text_key`. Indexed by line offsets."""

  def __init__(self, files: Sequence[str], text_key: str, skip_bad: bool = False):
    self.files, self.text_key = list(files), text_key
    self._init_bad_records(skip_bad)
    self.bounds = [_line_bounds(f) for f in self.files]  # document j spans bounds[j]:bounds[j + 1]
    counts = [len(b) - 1 for b in self.bounds]
    for f, n in zip(self.files, counts, strict=True):
      if not n:
        raise ValueError(f"{f} holds no JSON lines.")
    self.ends = np.cumsum(counts)
    self.fingerprint = _fingerprint("jsonl", text_key, self.files, counts)
    for k, n in enumerate(counts):  # fail early on a wrong text_key or a malformed file
      for j in _sample(n):
        try:
          self._read(k, j)
        except BadRecordError as e:
          self._bad(e)

  def __getitem__(self, i: int) -> str | None:
    try:
      return self._read(*self._locate(i))
    except BadRecordError as e:
      self._bad(e)
      return None

  def _read(self, k: int, j: int) -> str:
    start, end = int(self.bounds[k][j]), int(self.bounds[k][j + 1])
    with open(self.files[k], "rb") as f:
      f.seek(start)
      line = f.read(end - start)
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRecordError(f"{self._where(k, start)}: not a JSON line ({e})") from None
    return _text_of(record, self.text_key, self._where(k, start))

  def _where(self, k: int, start: int) -> str:
    """'<file> line <n>' of the line starting at byte `start` (counts newlines: errors only)."""
    with open(self.files[k], "rb") as f:
      line = f.read(start).count(b"\n") + 1
    return f"{self.files[k]} line {line}"


def _line_bounds(path: str) -> np.ndarray:
  """Start offsets of the non-blank lines of `path`, then its size (blank lines join the last)."""
  bounds = [np.zeros(1, np.int64)]
  size = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
      bounds.append(newlines.astype(np.int64) + size + 1)
      size += len(chunk)
  bounds = np.unique(np.concatenate([*bounds, np.array([size], np.int64)]))
  keep = np.diff(bounds) > 2  # a line of 2 bytes or less ("\n", "\r\n", "{}") holds no document
  return np.append(bounds[:-1][keep], size)


class ParquetDocuments(_BadRecords, _Located):
  """Column `text_key` of parquet files, read one row group at a time with a small LRU cache."""

  def __init__(self, files: Sequence[str], text_key: str, skip_bad: bool = False):
    self.files, self.text_key = list(files), text_key
    self._init_bad_records(skip_bad)
    groups, counts = [], []
    for k, f in enumerate(self.files):
      pf = pq.ParquetFile(f)
      if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{f}: no column {text_key!r} (columns: {pf.schema_arrow.names}).")
      if pf.metadata.num_rows == 0:
        raise ValueError(f"{f} holds no rows.")
      kind = pf.schema_arrow.field(text_key).type
      if kind not in (pa.string(), pa.large_string()):
        raise ValueError(f"{f}: column {text_key!r} holds {kind}, not text.")
      rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
      groups += [(k, g, n) for g, n in enumerate(rows)]
      counts.append(pf.metadata.num_rows)
    self.groups = np.array([(k, g) for k, g, _ in groups], dtype=np.int64)
    self.ends = np.cumsum([n for _, _, n in groups])
    self.fingerprint = _fingerprint("parquet", text_key, self.files, counts)
    self._cache, self._lock = collections.OrderedDict(), threading.Lock()

  def __setstate__(self, state: dict) -> None:
    super().__setstate__(state)
    self._cache, self._lock = collections.OrderedDict(), threading.Lock()

  def __getitem__(self, i: int) -> str | None:
    g, row = self._locate(i)
    text = self._row_group(g)[row]
    if text is None:  # a null in a string column
      k, group = self.groups[g]
      self._bad(BadRecordError(f"{self.files[k]} row group {group} row {row}: {self.text_key!r} "
                               "is null, not a string."))
    return text

  def _row_group(self, g: int) -> list[str]:
    with self._lock:
      if g in self._cache:
        self._cache.move_to_end(g)
        return self._cache[g]
      k, group = self.groups[g]
      table = pq.ParquetFile(self.files[k]).read_row_group(int(group), columns=[self.text_key])
      texts = table.column(0).to_pylist()
      self._cache[g] = texts
      if len(self._cache) > _ROW_GROUP_CACHE:
        self._cache.popitem(last=False)
      return texts


class ArrayRecordDocuments(_BadRecords, Sequence):
  """ArrayRecord files whose records are UTF-8 JSON objects with `text_key`, or raw UTF-8 text.

  A record that parses as a JSON object must hold `text_key`; anything else is taken as text.
  """

  def __init__(self, files: Sequence[str], text_key: str, skip_bad: bool = False):
    self.files, self.text_key = list(files), text_key
    self._init_bad_records(skip_bad)
    counts = []
    for f in self.files:
      reader = array_record_module.ArrayRecordReader(f)
      counts.append(reader.num_records())
      if not counts[-1]:
        reader.close()
        raise ValueError(f"{f} holds no records.")
      sample = _sample(counts[-1])
      for i, record in zip(sample, reader.read(sample), strict=True):
        try:
          self._decode(record, f"{f} record {i}")
        except BadRecordError as e:
          self._bad(e)
      reader.close()
    self.source = array_record_data_source.ArrayRecordDataSource(self.files)
    self.fingerprint = _fingerprint("arrayrecord", text_key, self.files, counts)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> str | None:
    i = _check_index(i, len(self))
    try:
      return self._decode(self.source[i], f"ArrayRecord record {i}")
    except BadRecordError as e:
      self._bad(e)
      return None

  def _decode(self, record: bytes, where: str) -> str:
    try:
      text = record.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecordError(f"{where}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("{"):
      try:
        obj = json.loads(text)
      except json.JSONDecodeError:
        return text
      if isinstance(obj, dict):
        return _text_of(obj, self.text_key, where)
    return text


_READERS = {
  "jsonl": JsonlDocuments,
  "parquet": ParquetDocuments,
  "arrayrecord": ArrayRecordDocuments,
}


def open_documents(source: str, pattern: str, text_key: str,
                   skip_bad: bool = False) -> Sequence[str]:
  """A random-access reader of the files matching `pattern` (jsonl | parquet | arrayrecord); a
  sample of every file's records is read at once. A bad record raises BadRecordError when read,
  or (`skip_bad`) reads as None and is counted in `bad_records`."""
  if source not in _READERS:
    raise ValueError(f"Unknown data.source {source!r}: expected embedded or {list(_READERS)}.")
  return _READERS[source](expand_glob(pattern), text_key, skip_bad)
