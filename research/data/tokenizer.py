"""Tokenizers: a byte-level BPE trained on the train split (cached), or any tokenizer.json."""

import os
import tempfile
from collections.abc import Sequence

import ml_collections as mlc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from research.data import corpus

EOS = "<|endoftext|>"  # id 0 of the trained BPE: end of document and padding
_FOREIGN_EOS = ("<|endoftext|>", "</s>", "<|im_end|>")  # tried in this order for a tokenizer.json


def train_bpe(docs: Sequence[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE with `EOS` as id 0, trained deterministically on `docs` in order."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS],
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  texts = (d for d in docs if d is not None)  # None: a bad record skipped by the reader
  tok.train_from_iterator(texts, trainer=trainer, length=len(docs))
  return tok


def get_tokenizer(data_cfg: mlc.ConfigDict, cache_dir: str, train_docs: Sequence[str]) -> Tokenizer:
  """`data.tokenizer == "bpe"`: train on `train_docs` (or load the cached file); else a path."""
  if data_cfg.tokenizer != "bpe":
    path = data_cfg.tokenizer
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"data.tokenizer={data_cfg.tokenizer!r} is neither 'bpe' nor a tokenizer.json file."
      )
    return Tokenizer.from_file(path)
  checksum = corpus.docs_checksum(train_docs)
  path = os.path.join(cache_dir, f"tokenizer-bpe{data_cfg.bpe_vocab_size}-{checksum[:12]}.json")
  if os.path.exists(path):
    return Tokenizer.from_file(path)
  tok = train_bpe(train_docs, data_cfg.bpe_vocab_size)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-tokenizer-")
  os.close(fd)
  tok.save(tmp)
  os.replace(tmp, path)
  return tok


def eos_id(tok: Tokenizer) -> int:
  """Id of the end-of-document token: `<|endoftext|>`, else `</s>`, else `<|im_end|>`."""
  for token in _FOREIGN_EOS:
    i = tok.token_to_id(token)
    if i is not None:
      return i
  raise ValueError(f"The tokenizer has none of the end-of-document tokens {_FOREIGN_EOS}.")
