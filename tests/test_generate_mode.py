"""launch.py --config.mode=generate on a tiny trained MoR run, and the top-p sampler
(docs/inference.md)."""

import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from research import config as config_lib
from research.analysis import routing
from research.config import ConfigError
from research.infer import decode, generate
from research.infer import engine as engine_lib
from research.model import early_exit
from research.model.lm import LanguageModel
from tests import launch_util, model_util


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[launch_util.Launcher, str]:
  """(launcher, workdir) of a 4-step expert-choice MoR run (trained with top-k; decoding routes
  by threshold)."""
  root = tmp_path_factory.mktemp("generate")
  launcher = launch_util.Launcher(root / "shared", config="configs/mor.py:tiny")
  workdir = root / "run"
  result = launcher.run(workdir, {"model.num_layers": 5, "train.steps": 4})
  assert result.returncode == 0, result.stderr
  return launcher, workdir


def test_launch_generate_prints_the_checkpoints_sampled_continuations(trained):
  """The tiny run decoded with the default sampling (temperature 0.8, top-p 0.95), then
  greedily."""
  launcher, workdir = trained
  knobs = {"mode": "generate", "model.num_layers": 5, "generate.prompt": "KING",
           "generate.num_tokens": 6, "generate.num_samples": 2}
  sampled = launcher.run(workdir, knobs)
  assert sampled.returncode == 0, sampled.stderr
  greedy = launcher.run(workdir, dict(knobs, **{"generate.temperature": 0}))
  assert greedy.returncode == 0, greedy.stderr

  loaded = routing.load_run(str(workdir))
  tok = loaded.run.tokenizer
  ids = tok.encode("KING", add_special_tokens=False).ids
  prompt_BT = jnp.asarray([ids] * 2)
  out_BN = np.asarray(decode.generate(loaded.model, prompt_BT, 6, temperature=0.8, top_p=0.95,
                                      key=jax.random.key(0)))
  texts = [generate.continuation(tok, row) for row in out_BN.tolist()]
  header = f"step 4: 6 tokens after a {len(ids)}-token prompt, temperature 0.8, top-p 0.95, seed 0"
  assert f"{header}\n[0] KING{texts[0]}\n" in sampled.stdout
  assert f"\n[1] KING{texts[1]}\n" in sampled.stdout.split(header, 1)[1]

  out_N = np.asarray(decode.generate(loaded.model, jnp.asarray([ids]), 6))[0]
  text = generate.continuation(tok, out_N.tolist())
  header = f"step 4: 6 tokens after a {len(ids)}-token prompt, greedy"
  assert f"{header}\n[0] KING{text}\n" in greedy.stdout
  assert f"\n[1] KING{text}\n" in greedy.stdout


def test_launch_generate_serves_a_prompts_file_through_the_engine(trained, tmp_path):
  """Three prompts (one blank line skipped) through 2 slots, greedy: generations.jsonl holds
  each prompt's decode.generate continuation alone, its depths, and the summary line prints
  tokens/s and the mean depth; a progress bar goes to stderr."""
  launcher, workdir = trained
  prompts = ["KING", "ROMEO: O", "", "First Citizen:"]
  path = tmp_path / "prompts.txt"
  path.write_text("\n".join(prompts) + "\n")
  knobs = {"mode": "generate", "model.num_layers": 5, "generate.prompts_file": str(path),
           "generate.num_tokens": 5, "generate.temperature": 0, "generate.slots": 2,
           "generate.max_len": 32}
  result = launcher.run(workdir, knobs)
  assert result.returncode == 0, result.stderr
  assert "3/3" in result.stderr  # tqdm
  with open(workdir / "generations.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["prompt"] for r in records] == [p for p in prompts if p]

  loaded = routing.load_run(str(workdir))
  tok = loaded.run.tokenizer
  for r in records:
    ids = tok.encode(r["prompt"], add_special_tokens=False).ids
    want = np.asarray(decode.generate(loaded.model, jnp.asarray([ids]), 5, max_len=32))[0].tolist()
    eos = tok.token_to_id("<|endoftext|>")
    want = want[:want.index(eos) + 1] if eos in want else want
    assert r["tokens"] == want
    assert r["completion"] == generate.continuation(tok, want)
    assert r["finish"] == ("eos" if eos in want else "length")
    assert 0 <= r["mean_depth"] <= 3 and r["time_s"] >= 0
  total = sum(len(r["tokens"]) for r in records)
  assert "serving 3 prompts" in result.stdout and "sequence engine" in result.stdout
  assert f"{total} tokens in " in result.stdout and "tokens/s" in result.stdout
  assert "mean depth " in result.stdout

  depthwise = launcher.run(workdir, dict(knobs, **{"generate.engine": "depthwise",
                                                   "generate.block_rows": 1}))
  assert depthwise.returncode == 0, depthwise.stderr
  with open(workdir / "generations.jsonl") as f:
    again = [json.loads(line) for line in f]
  assert [r["tokens"] for r in again] == [r["tokens"] for r in records]
  np.testing.assert_allclose([r["mean_depth"] for r in again], [r["mean_depth"] for r in records])
  assert "depthwise engine" in depthwise.stdout and "shared-block rows in " in depthwise.stdout


EXIT_RUN = {"model.num_layers": 4, "model.recursion.strategy": "cycle",
            "model.recursion.num_recursions": 2, "model.recursion.early_exit": True,
            "train.exit_loss": "aggressive", "train.steps": 4}


def test_generate_serves_an_early_exit_run_with_generate_exit_threshold(trained, tmp_path):
  """A 4-step cycle run with one exit per loop, served from a prompts file by the depth-wise
  engine with generate.exit_threshold (in process): each record equals decode.generate of the
  model loaded with that threshold, tokens exit after loop 1 (mean depth < 2) and the summary
  prints the mean depth. The threshold on a run without exits is one error naming the key."""
  launcher, mor_workdir = trained
  workdir = tmp_path / "exit_run"
  result = launcher.run(workdir, EXIT_RUN, config="configs/vanilla.py:tiny")
  assert result.returncode == 0, result.stderr
  prompts = ["KING", "ROMEO: O"]
  path = tmp_path / "prompts.txt"
  path.write_text("\n".join(prompts) + "\n")
  plain = routing.load_run(str(workdir))
  tok = plain.run.tokenizer
  assert plain.model.core.rule is None  # trained without a threshold: every loop
  # tau: the median loop-1 exit confidence of the prompts' tokens, so that about half of them
  # exit after loop 1 (loop 1 runs on every token: its state is the unrouted forward's)
  conf = [early_exit.confidence(plain.model(jnp.asarray([tok.encode(p).ids]), exits=True)[0][0])
          for p in prompts]
  tau = float(np.median(np.concatenate([np.asarray(c).ravel() for c in conf])))
  cfg = model_util.tiny_config()
  cfg.generate.update(prompts_file=str(path), num_tokens=6, temperature=0.0, slots=2, max_len=24,
                      engine="depthwise", exit_threshold=tau)
  config_lib.validate(cfg)
  records = generate.serve_prompts_file(cfg, str(workdir))
  loaded = routing.load_run(str(workdir), {"recursion.exit_threshold": tau})
  assert loaded.model.core.rule.threshold == tau
  eos = tok.token_to_id("<|endoftext|>")
  for r in records:
    ids = tok.encode(r["prompt"], add_special_tokens=False).ids
    want = np.asarray(decode.generate(loaded.model, jnp.asarray([ids]), 6, max_len=24))[0].tolist()
    assert r["tokens"] == (want[:want.index(eos) + 1] if eos in want else want)
    assert 1 <= r["mean_depth"] < 2
  cfg.generate.exit_threshold = 0.5
  with pytest.raises(ConfigError, match=r"config\.model\.recursion\.exit_threshold=0\.5: .*"
                     r"needs config\.model\.recursion\.early_exit=True"):
    generate.serve_prompts_file(cfg, str(mor_workdir))
  cfg.generate.exit_threshold = 2.0
  with pytest.raises(ConfigError, match=r"config\.generate\.exit_threshold=2\.0: must be -1"):
    config_lib.validate(cfg)


def test_launch_generate_refuses_bad_prompts_files_with_one_error_line(trained, tmp_path):
  """A missing file and a prompt longer than the cache: one error line naming the key, exit 1.
  An empty file is refused by the config check alike."""
  launcher, workdir = trained
  knobs = {"mode": "generate", "model.num_layers": 5, "generate.num_tokens": 4}
  missing = launcher.run(workdir, dict(knobs, **{"generate.prompts_file": tmp_path / "no.txt"}))
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == (
      f"error: config.generate.prompts_file='{tmp_path / 'no.txt'}': no such file")
  long = tmp_path / "long.txt"
  long.write_text("KING\n" + "ROMEO " * 40 + "\n")
  too_long = launcher.run(workdir, dict(knobs, **{"generate.prompts_file": long,
                                                  "generate.max_len": 16}))
  assert too_long.returncode == 1
  last = too_long.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.generate.max_len=16: line 2 of ") and "fit" in last
  assert "serving" not in too_long.stdout  # refused before the engine was built

  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  cfg = model_util.tiny_config()
  cfg.mode, cfg.generate.prompts_file = "generate", str(empty)
  with pytest.raises(ConfigError, match=r"config\.generate\.prompts_file='.*empty\.txt': holds no"):
    config_lib.validate(cfg)
  cfg.generate.prompts_file = str(long)
  cfg.generate.num_samples = 2
  with pytest.raises(ConfigError, match=r"config\.generate\.num_samples=2: must be 1"):
    config_lib.validate(cfg)


def test_the_depthwise_engine_refuses_a_model_it_cannot_serve_naming_the_key():
  cfg = model_util.tiny_config()
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  cfg.generate.engine = "depthwise"
  with pytest.raises(ConfigError, match=r"config\.generate\.engine='depthwise': "
                     r"config\.model\.mor\.kind: must be 'expert'"):
    generate.make_engine(cfg.generate, model)
  cfg.generate.engine = "sequence"
  assert type(generate.make_engine(cfg.generate, model)) is engine_lib.Engine
  cfg.generate.block_rows = 9
  with pytest.raises(ConfigError, match=r"config\.generate\.block_rows=9: must be in 0\.\.config"):
    config_lib.validate(cfg)


def test_top_p_samples_only_from_the_nucleus():
  """p = (0.5, 0.3, 0.15, 0.05): top-p 0.8 keeps {0, 1} (0.5 < 0.8 <= 0.8), 0.81 adds 2."""
  logits_BV = jnp.log(jnp.tile(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]), (4000, 1)))
  drawn = {}
  for top_p in (0.8, 0.81, 1.0):
    drawn[top_p] = np.asarray(decode.pick(logits_BV, 1.0, jax.random.key(1), top_p))
  assert set(drawn[0.8].tolist()) == {1, 3}
  assert set(drawn[0.81].tolist()) == {0, 1, 3}
  assert set(drawn[1.0].tolist()) == {0, 1, 2, 3}
  share = np.mean(drawn[0.8] == 1)  # renormalised: 0.5 / 0.8
  assert abs(share - 0.625) < 0.03, share
  tiny = decode.pick(logits_BV[:3], 2.0, jax.random.key(2), 1e-6)
  assert tiny.tolist() == [1, 1, 1]
  plain = decode.pick(logits_BV, 0.7, jax.random.key(3))
  assert plain.tolist() == jax.random.categorical(jax.random.key(3), logits_BV / 0.7).tolist()


def test_a_blank_continuation_is_shown_as_token_ids_with_the_reason():
  tok = Tokenizer.from_str(_tiny_tokenizer_json())
  newline, eos = tok.token_to_id("\n"), tok.token_to_id("<|endoftext|>")
  line = generate.why_blank(tok, [newline] * 3 + [eos, newline], greedy=True)
  assert line == (f"(whitespace only: token ids {newline} '\\n' x3, then end-of-document; "
                  "greedy decoding repeats the likeliest token; sample with "
                  "--config.generate.temperature=0.8)")
  assert generate.why_blank(tok, [eos, newline], greedy=False) == (
      "(no text: the first generated token is the end-of-document token)")


def test_top_p_outside_zero_one_is_refused_naming_the_key():
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match=rf"config\.generate\.top_p={top_p}: must be in"):
      generate.check(mlc.ConfigDict({"top_p": top_p}))


def _tiny_tokenizer_json() -> str:
  """A word-level tokenizer with an end-of-document token, a newline and two words."""
  vocab = {"<|endoftext|>": 0, "\n": 1, "KING": 2, "ROMEO": 3}
  return json.dumps({
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                        "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
      "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
      "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"}})
