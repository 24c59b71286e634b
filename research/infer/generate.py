"""config.mode='generate': continue a prompt with a run's newest checkpoint (docs/inference.md).

  python launch.py --config=configs/mor.py:tiny --workdir=runs/mor_tiny --config.mode=generate \
      --config.generate.prompt='ROMEO:' --config.generate.num_tokens=64

The model, tokenizer and data come from <workdir>/config.json (research.analysis.routing.load_run);
only config.generate.* is read from the command line. The default samples (temperature 0.8,
top-p 0.95): greedy decoding of a small model tends to repeat its likeliest token (the tiny MoR
run repeats the newline). A continuation with no visible text is shown as its token ids, with
the reason."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tokenizers import Tokenizer

from research.analysis import routing
from research.config import ConfigError
from research.data import tokenizer as tokenizer_lib
from research.infer import decode


def check(g: mlc.ConfigDict) -> None:
  """Raises ConfigError naming the generate key whose value cannot be used."""
  if not 0 < g.top_p <= 1:
    raise ConfigError(f"config.generate.top_p={g.top_p}: must be in (0, 1] (1: no nucleus cut)")


def generate_from_checkpoint(cfg: mlc.ConfigDict, workdir: str) -> list[str]:
  """Continues config.generate.prompt num_samples times (one batch) with the newest checkpoint of
  `workdir`, prints each continuation (cut at the first end-of-document token; one with no
  visible text as token ids and why) and returns them."""
  g = cfg.generate
  check(g)
  loaded = routing.load_run(workdir)
  tok = loaded.run.tokenizer
  ids = tok.encode(g.prompt, add_special_tokens=False).ids
  if not ids:
    raise ConfigError(f"config.generate.prompt={g.prompt!r}: encodes to no tokens")
  prompt_BT = jnp.asarray([ids] * g.num_samples, jnp.int32)
  tokens_BN = np.asarray(decode.generate(loaded.model, prompt_BT, g.num_tokens,
                                         temperature=g.temperature, top_p=g.top_p,
                                         key=jax.random.key(g.seed)))
  rows = tokens_BN.tolist()
  texts = [continuation(tok, row) for row in rows]
  if g.temperature == 0:
    how = "greedy"
  else:
    how = f"temperature {g.temperature}, top-p {g.top_p}, seed {g.seed}"
  print(f"step {loaded.step}: {g.num_tokens} tokens after a {len(ids)}-token prompt, {how}",
        flush=True)
  for i, (text, row) in enumerate(zip(texts, rows, strict=True)):
    print(f"[{i}] {g.prompt}{text}", flush=True)
    if not text.strip():
      print(f"    {why_blank(tok, row, greedy=g.temperature == 0)}", flush=True)
  return texts


def continuation(tok: Tokenizer, tokens: list[int]) -> str:
  """The text of generated tokens up to the first end-of-document token (the document ends)."""
  eos = tokenizer_lib.eos_id(tok)
  return tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)


def why_blank(tok: Tokenizer, tokens: list[int], *, greedy: bool) -> str:
  """One line for a continuation with no visible text: its tokens (runs of one id counted) up to
  the end-of-document token, and what to try."""
  eos = tokenizer_lib.eos_id(tok)
  kept = tokens[:tokens.index(eos)] if eos in tokens else tokens
  if not kept:
    return "(no text: the first generated token is the end-of-document token)"
  runs: list[list[int]] = []
  for t in kept:
    if runs and runs[-1][0] == t:
      runs[-1][1] += 1
    else:
      runs.append([t, 1])
  shown = ", ".join(f"{t} {tok.decode([t])!r}" + (f" x{n}" if n > 1 else "") for t, n in runs)
  ended = ", then end-of-document" if eos in tokens else ""
  hint = ("greedy decoding repeats the likeliest token; sample with "
          "--config.generate.temperature=0.8" if greedy else "try another generate.seed")
  return f"(whitespace only: token ids {shown}{ended}; {hint})"
