"""launch.py --config.mode=generate on a tiny trained MoR run, and the top-p sampler
(docs/inference.md)."""

import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from tokenizers import Tokenizer

from research.analysis import routing
from research.infer import decode, generate
from tests import launch_util


def test_launch_generate_prints_the_checkpoints_sampled_continuations(tmp_path):
  """A 4-step expert-choice MoR run (trained with top-k; decoding routes by threshold), decoded
  with the default sampling (temperature 0.8, top-p 0.95), then greedily."""
  launcher = launch_util.Launcher(tmp_path / "shared", config="configs/mor.py:tiny")
  workdir = tmp_path / "run"
  result = launcher.run(workdir, {"model.num_layers": 5, "train.steps": 4})
  assert result.returncode == 0, result.stderr
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
