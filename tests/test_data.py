"""Tests of research/data: corpus, split, tokenizer, grain pipeline, file readers."""

import hashlib
import json
import pickle
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from array_record.python import array_record_module
from tokenizers import Tokenizer, models

from configs import base
from research.data import corpus, pipeline, readers, tokenizer

DOCS = [
  f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(i % 11 + 3)) for i in range(60)
]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_bpe(DOCS, 300)


def data_cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def stream_documents(ds, tok):
  """Decodes the documents of a finite dataset from the concatenated non-padding tokens."""
  ids = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in ds])
  eos = tokenizer.eos_id(tok)
  ends = np.flatnonzero(ids == eos)
  assert ends[-1] == len(ids) - 1
  return [tok.decode(d.tolist()) for d in np.split(ids, ends[:-1] + 1)]


# --- corpus -------------------------------------------------------------------------------------


def test_clean_play():
  markdown = (
    "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BARNARDO and FRANCISCO_\n\n"
    "**BARNARDO**  \nWho's there?  \n\n**FRANCISCO**  \nNay, answer me.\n"
  )
  assert corpus.clean_play(markdown) == (
    "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BARNARDO and FRANCISCO\n\n"
    "BARNARDO\nWho's there?\n\nFRANCISCO\nNay, answer me."
  )


def test_missing_package_names_the_pip_command():
  with pytest.raises(ModuleNotFoundError, match=re.escape(corpus.PIP_COMMAND)):
    corpus._package_dir("no_such_corpus_package")


def test_split_is_deterministic_and_disjoint():
  train, valid = corpus.split_indices(100, 0.1, seed=3)
  train2, valid2 = corpus.split_indices(100, 0.1, seed=3)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(valid, valid2)
  assert len(valid) == 10 and not set(train) & set(valid)
  assert sorted(set(train) | set(valid)) == list(range(100))
  assert not np.array_equal(valid, corpus.split_indices(100, 0.1, seed=4)[1])
  assert [len(s) for s in corpus.split_indices(2, 0.01, seed=0)] == [1, 1]
  train_docs, valid_docs = corpus.split_documents(DOCS, 0.1, seed=3)
  assert list(valid_docs) == [DOCS[i] for i in corpus.split_indices(60, 0.1, 3)[1]]
  assert len(train_docs) + len(valid_docs) == len(DOCS)


def test_checksum_is_stable():
  assert corpus.corpus_checksum(["a", "b"]) == hashlib.sha256(b"a\x00b").hexdigest()
  assert corpus.corpus_checksum(["a", "b"]) != corpus.corpus_checksum(["b", "a"])
  assert corpus.docs_checksum(DOCS) == corpus.corpus_checksum(DOCS)


def test_embedded_corpus_and_manifest(tmp_path):
  docs = corpus.embedded_documents()
  assert len(docs) == 38 + 1189
  assert 9.0e6 < sum(len(d.encode()) for d in docs) < 9.2e6
  assert corpus.corpus_checksum(docs) == corpus.EMBEDDED_SHA256
  cfg = data_cfg()
  train, valid = corpus.load_split(cfg, str(tmp_path))
  assert len(train) + len(valid) == len(docs) and len(valid) == round(0.05 * len(docs))
  path = tmp_path / corpus.MANIFEST
  manifest = json.loads(path.read_text())
  assert manifest["train_checksum"] == corpus.corpus_checksum(train)
  assert manifest["valid_docs"] == len(valid)
  corpus.load_split(cfg, str(tmp_path))  # same data: validates
  path.write_text(json.dumps(manifest | {"valid_checksum": "0" * 64}))
  with pytest.raises(ValueError, match="corpus changed"):
    corpus.load_split(cfg, str(tmp_path))
  corpus.load_split(data_cfg(split_seed=7), str(tmp_path))  # a new data config: rewrites
  assert json.loads(path.read_text())["split_seed"] == 7


# --- tokenizer ----------------------------------------------------------------------------------


def test_bpe_training_caching_and_round_trip(tmp_path, monkeypatch):
  cfg = data_cfg(bpe_vocab_size=300)
  tok = tokenizer.get_tokenizer(cfg, str(tmp_path), DOCS)
  checksum = corpus.corpus_checksum(DOCS)
  assert (tmp_path / f"tokenizer-bpe300-{checksum[:12]}.json").exists()
  assert tok.get_vocab_size() == 300 and tokenizer.eos_id(tok) == 0
  text = "Document 5: w1 w2 — café"
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text
  monkeypatch.setattr(tokenizer, "train_bpe", lambda *a: pytest.fail("cache not used"))
  assert tokenizer.get_tokenizer(cfg, str(tmp_path), DOCS).encode(text).ids == ids
  monkeypatch.undo()
  assert tokenizer.train_bpe(DOCS, 300).to_str() == tok.to_str()  # deterministic


def test_tokenizer_from_path(tmp_path, tok):
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = tokenizer.get_tokenizer(data_cfg(tokenizer=str(path)), str(tmp_path), DOCS)
  assert loaded.encode(DOCS[3]).ids == tok.encode(DOCS[3]).ids
  assert tokenizer.get_tokenizer(data_cfg(tokenizer=str(tmp_path)), "", DOCS).to_str()
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
    tokenizer.get_tokenizer(data_cfg(tokenizer=str(tmp_path / "nope.json")), "", DOCS)


def test_eos_id_of_foreign_tokenizers():
  tok = Tokenizer(models.BPE())
  tok.add_special_tokens(["<s>", "</s>"])
  assert tokenizer.eos_id(tok) == 1
  with pytest.raises(ValueError, match="end-of-document"):
    tokenizer.eos_id(Tokenizer(models.BPE()))


# --- pipeline -----------------------------------------------------------------------------------


def test_tokenize_appends_eos_and_ignores_special_text(tok):
  out = pipeline.Tokenize(tok).map("w1 w2")
  assert out["tokens"].dtype == np.int32
  assert out["tokens"].tolist() == [*tok.encode("w1 w2").ids, 0]
  assert 0 not in pipeline.Tokenize(tok).map("a <|endoftext|> b")["tokens"][:-1]
  assert pickle.loads(pickle.dumps(pipeline.Tokenize(tok))).map("w1 w2")["tokens"][-1] == 0


def test_batch_format_positions_and_segments(tok):
  ds = pipeline.make_dataset(DOCS, tok, seq_len=16, batch_size=4, seed=0, shuffle=True, repeat=True)
  for batch in batches(ds, 10):
    assert set(batch) == {"tokens", "positions", "segment_ids"}
    for v in batch.values():
      assert v.shape == (4, 17) and v.dtype == np.int32
    pos, seg, toks = batch["positions"], batch["segment_ids"], batch["tokens"]
    assert (pos[:, 0] == 0).all() and (seg[:, 0] == 1).all() and (seg > 0).all()
    new_doc = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal(new_doc, pos[:, 1:] == 0)
    np.testing.assert_array_equal(pos[:, 1:][~new_doc], pos[:, :-1][~new_doc] + 1)
    np.testing.assert_array_equal(new_doc, toks[:, :-1] == 0)  # EOS ends every document


def test_finite_pipeline_yields_every_document_once(tok):
  ds = pipeline.make_dataset(
    DOCS, tok, seq_len=16, batch_size=1, seed=0, shuffle=False, repeat=False
  )
  assert stream_documents(ds, tok) == DOCS


def test_shuffle_depends_on_seed_only(tok):
  def first(seed):
    ds = pipeline.make_dataset(
      DOCS, tok, seq_len=16, batch_size=4, seed=seed, shuffle=True, repeat=True
    )
    return np.stack([b["tokens"] for b in batches(ds, 3)])

  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


def test_host_shards_are_disjoint(tok):
  shards = [
    stream_documents(
      pipeline.make_dataset(
        DOCS,
        tok,
        seq_len=16,
        batch_size=1,
        seed=0,
        shuffle=False,
        repeat=False,
        process_index=p,
        process_count=2,
      ),
      tok,
    )
    for p in range(2)
  ]
  assert shards == [DOCS[0::2], DOCS[1::2]]


def test_iterator_state_resumes_exactly(tok):
  ds = pipeline.make_dataset(DOCS, tok, seq_len=16, batch_size=4, seed=5, shuffle=True, repeat=True)
  it = iter(ds)
  for _ in range(7):  # > one epoch, mid-document
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_orbax_checkpoints_the_iterator(tmp_path, tok):
  ds = pipeline.make_dataset(DOCS, tok, seq_len=16, batch_size=4, seed=5, shuffle=True, repeat=True)
  it = iter(ds)
  next(it)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  handlers = {"data": grain.checkpoint.CheckpointHandler()}
  with ocp.CheckpointManager(
    tmp_path, item_names=("data",), item_handlers=handlers, options=options
  ) as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  want = next(it)["tokens"]
  it2 = iter(ds)
  with ocp.CheckpointManager(
    tmp_path, item_names=("data",), item_handlers=handlers, options=options
  ) as mngr:
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  np.testing.assert_array_equal(next(it2)["tokens"], want)


def test_count_tokens(tok):
  assert pipeline.count_tokens(DOCS, tok, chunk=7) == sum(len(tok.encode(d).ids) + 1 for d in DOCS)


# --- readers ------------------------------------------------------------------------------------


def write_jsonl(path, texts, key="text"):
  path.write_text(
    "".join(json.dumps({key: t, "id": i}) + "\n" * (1 + i % 3) for i, t in enumerate(texts))
  )


def write_parquet(path, texts, key="text"):
  pq.write_table(pa.table({key: texts}), path, row_group_size=4)


def write_arrayrecord(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def check_reader(docs, texts):
  assert len(docs) == len(texts) and list(docs) == texts
  order = np.random.default_rng(0).permutation(len(texts))
  assert [docs[int(i)] for i in order] == [texts[i] for i in order]
  assert docs[-1] == texts[-1]
  assert list(pickle.loads(pickle.dumps(docs))) == texts


def test_jsonl_reader(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", DOCS[:25])
  write_jsonl(tmp_path / "b.jsonl", DOCS[25:])
  check_reader(readers.open_documents("jsonl", str(tmp_path / "*.jsonl"), "text"), DOCS)
  with pytest.raises(ValueError, match="content"):
    readers.open_documents("jsonl", str(tmp_path / "*.jsonl"), "content")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"empty\.jsonl"):
    readers.open_documents("jsonl", str(tmp_path / "*.jsonl"), "text")


def test_parquet_reader(tmp_path):
  write_parquet(tmp_path / "a.parquet", DOCS[:30])
  write_parquet(tmp_path / "b.parquet", DOCS[30:])
  docs = readers.open_documents("parquet", str(tmp_path / "*.parquet"), "text")
  assert len(docs.groups) == 16  # read lazily, one row group at a time
  check_reader(docs, DOCS)
  with pytest.raises(ValueError, match="'content'"):
    readers.open_documents("parquet", str(tmp_path / "*.parquet"), "content")
  write_parquet(tmp_path / "c.parquet", [])
  with pytest.raises(ValueError, match=r"c\.parquet"):
    readers.open_documents("parquet", str(tmp_path / "*.parquet"), "text")


def test_arrayrecord_reader(tmp_path):
  write_arrayrecord(
    tmp_path / "a.array_record", [json.dumps({"text": t}).encode() for t in DOCS[:30]]
  )
  write_arrayrecord(tmp_path / "b.array_record", [t.encode() for t in DOCS[30:]])
  check_reader(
    readers.open_documents("arrayrecord", str(tmp_path / "*.array_record"), "text"), DOCS
  )
  with pytest.raises(ValueError, match="'content'"):
    readers.open_documents("arrayrecord", str(tmp_path / "*.array_record"), "content")
  write_arrayrecord(tmp_path / "c.array_record", [])
  with pytest.raises(ValueError, match=r"c\.array_record"):
    readers.open_documents("arrayrecord", str(tmp_path / "*.array_record"), "text")


def test_reader_errors(tmp_path):
  with pytest.raises(ValueError, match="nothing"):
    readers.open_documents("jsonl", str(tmp_path / "nothing*.jsonl"), "text")
  with pytest.raises(ValueError, match="csv"):
    readers.open_documents("csv", str(tmp_path / "*.csv"), "text")


def test_load_split_of_files(tmp_path, tok):
  write_jsonl(tmp_path / "train.jsonl", DOCS[:50])
  write_jsonl(tmp_path / "valid.jsonl", DOCS[50:])
  cfg = data_cfg(source="jsonl", train_files=str(tmp_path / "train.jsonl"), valid_fraction=0.1)
  train, valid = corpus.load_split(cfg, str(tmp_path / "cache"))
  assert len(train) == 45 and len(valid) == 5 and not set(train) & set(valid)
  manifest = json.loads((tmp_path / "cache" / corpus.MANIFEST).read_text())
  assert manifest["train_checksum"] == train.fingerprint != valid.fingerprint
  cfg.valid_files = str(tmp_path / "valid.jsonl")
  train, valid = corpus.load_split(cfg, str(tmp_path / "cache"))
  assert list(train) == DOCS[:50] and list(valid) == DOCS[50:]
  ds = pipeline.make_dataset(
    valid, tok, seq_len=8, batch_size=1, seed=0, shuffle=False, repeat=False
  )
  assert stream_documents(ds, tok) == DOCS[50:]


def test_worker_processes(tok):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (absl.app.run parses them)
  kwargs = dict(seq_len=16, batch_size=4, seed=5, shuffle=True, repeat=True)
  want = batches(pipeline.make_dataset(DOCS, tok, **kwargs), 6)
  it = iter(pipeline.make_dataset(DOCS, tok, worker_count=1, **kwargs))
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  it2 = iter(pipeline.make_dataset(DOCS, tok, worker_count=1, **kwargs))
  it2.set_state(state)
  got += [next(it2) for _ in range(3)]
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g["tokens"], w["tokens"])


def test_every_iterator_state_of_a_long_run_restores_the_next_batch(tok):
  """Item 1 of issue 15: grain's packer marks "no leftover" with the tuple (-1, -1), which JSON
  turns into a list; restoring that pulled one extra document. 1000 batches of short rows, so that
  many states fall on a row that ends exactly at a document boundary."""
  ds = pipeline.make_dataset(DOCS, tok, seq_len=8, batch_size=1, seed=3, shuffle=True,
                             repeat=True, num_threads=1, prefetch=2)
  it = iter(ds)
  states, following = [], []
  for _ in range(1000):
    states.append(json.dumps(it.get_state()))  # what the checkpoint file holds
    following.append(next(it)["tokens"])
  no_leftover = [s for s in states if '"remainder_slices": {"tokens": [-1, -1]}' in s
                 or '{"__tuple__": [-1, -1]}' in s]
  assert len(no_leftover) >= 10  # the case the test is about does occur
  restored = iter(ds)
  for i, (state, want) in enumerate(zip(states, following, strict=True)):
    restored.set_state(json.loads(state))
    np.testing.assert_array_equal(next(restored)["tokens"], want, err_msg=f"state {i}")
  for i, state in enumerate(states[:200]):  # a checkpoint written before the typed state
    legacy = json.loads(json.dumps(pipeline.decode_state(json.loads(state)["typed_state"])))
    restored.set_state(legacy)
    np.testing.assert_array_equal(next(restored)["tokens"], following[i], err_msg=f"legacy {i}")


def test_row_positions_and_scored_boundary_targets(tok):
  """Issue 15 item 18: the MoR code's packing, positions 0..T along the row and every target
  scored (one segment per row), as options; the default keeps per-document positions."""
  from research.train import step

  kwargs = dict(seq_len=16, batch_size=4, seed=5, shuffle=True, repeat=True)
  default = batches(pipeline.make_dataset(DOCS, tok, **kwargs), 3)
  official = batches(pipeline.make_dataset(DOCS, tok, positions="row",
                                           score_boundary_targets=True, **kwargs), 3)
  for want, got in zip(default, official, strict=True):
    np.testing.assert_array_equal(got["tokens"], want["tokens"])  # the same packing
    np.testing.assert_array_equal(got["positions"], np.broadcast_to(np.arange(17), (4, 17)))
    np.testing.assert_array_equal(got["segment_ids"], np.ones((4, 17), np.int32))
    assert (want["segment_ids"].max(axis=1) > 1).any()  # rows do hold several documents
    assert not (want["positions"] == np.arange(17)).all()
    *_, mask_default = step.lm_inputs(want)
    *_, mask_official = step.lm_inputs(got)
    assert np.asarray(mask_official).all()
    assert int(np.asarray(mask_default).sum()) < mask_default.size  # boundary targets masked


def test_score_boundary_targets_needs_attention_across_documents():
  from research import config as config_lib
  cfg = base.get_config()
  cfg.data.score_boundary_targets = True
  with pytest.raises(config_lib.ConfigError, match=r"needs config\.model\.attend_across_segments"):
    config_lib.validate_data(cfg)
  cfg.model.attend_across_segments = True
  config_lib.validate_data(cfg)
  cfg.data.positions = "sequence"
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.positions=.sequence."):
    config_lib.validate_data(cfg)


def test_data_seed_sets_the_document_order_apart_from_the_init_seed(tok):
  """Issue 15 item 19: data.seed=-1 follows config.seed; any other value fixes the order alone."""
  import types

  from research.train import loop

  def first_batch(seed, data_seed):
    cfg = base.get_config()
    cfg.seed, cfg.data.seed = seed, data_seed
    cfg.data.seq_len, cfg.train.batch_size, cfg.data.num_threads = 16, 4, 1
    run = types.SimpleNamespace(cfg=cfg, tokenizer=tok)
    return next(loop.make_iterator(run, DOCS, train=True))["tokens"]

  np.testing.assert_array_equal(first_batch(7, -1), first_batch(3, 7))
  np.testing.assert_array_equal(first_batch(1, 4), first_batch(2, 4))
  assert not np.array_equal(first_batch(1, 4), first_batch(1, 5))


def test_rows_of_t_tokens_leave_the_last_input_without_a_target(tok):
  """data.row_length="T" (the MoR code): rows pack T tokens, so the stream advances T per row and
  a padding column keeps batches T + 1 wide; the last input of a row has no target."""
  from research.train import step

  kwargs = dict(seq_len=16, batch_size=1, seed=5, shuffle=True, repeat=True)
  wide = np.concatenate([b["tokens"][0] for b in batches(pipeline.make_dataset(
      DOCS, tok, **kwargs), 4)])
  rows = batches(pipeline.make_dataset(DOCS, tok, positions="row", score_boundary_targets=True,
                                       row_length="T", **kwargs), 4)
  assert all(b["tokens"].shape == (1, 17) for b in rows)
  np.testing.assert_array_equal(np.concatenate([b["tokens"][0, :16] for b in rows]), wide[:64])
  for b in rows:
    assert b["segment_ids"][0, 16] == 0 and (b["segment_ids"][0, :16] == 1).all()
    np.testing.assert_array_equal(b["positions"][0, :16], np.arange(16))
    *_, mask = step.lm_inputs(b)
    np.testing.assert_array_equal(np.asarray(mask)[0], np.arange(16) < 15)  # T - 1 targets
  with pytest.raises(ValueError, match="row_length"):
    pipeline.make_dataset(DOCS, tok, row_length="T+2", **kwargs)


def test_shuffle_window_permutes_the_packed_rows_of_each_window(tok):
  """data.shuffle_window: the same rows as without it, each window of W rows in another order;
  every state restores the next batch exactly (JSON round trip), mid-window included."""
  def rows(window, n):
    ds = pipeline.make_dataset(DOCS, tok, seq_len=8, batch_size=1, seed=3, shuffle=True,
                               repeat=True, shuffle_window=window, num_threads=1, prefetch=2)
    return ds, [tuple(b["tokens"][0]) for b in batches(ds, n)]

  _, plain = rows(0, 60)
  ds, shuffled = rows(6, 60)
  assert shuffled != plain
  for w in range(10):  # window w holds exactly the rows w*6 .. w*6+5 of the plain stream
    assert sorted(shuffled[6 * w:6 * w + 6]) == sorted(plain[6 * w:6 * w + 6])
  it = iter(ds)
  states, following = [], []
  for _ in range(20):
    states.append(json.dumps(it.get_state()))
    following.append(next(it)["tokens"])
  restored = iter(ds)
  for i, (state, want) in enumerate(zip(states, following, strict=True)):
    restored.set_state(json.loads(state))
    np.testing.assert_array_equal(next(restored)["tokens"], want, err_msg=f"state {i}")
