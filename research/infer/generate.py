"""config.mode='generate': continue a prompt with a run's newest checkpoint (docs/inference.md).

  python launch.py --config=configs/mor.py:tiny --workdir=runs/mor_tiny --config.mode=generate \
      --config.generate.prompt='ROMEO:' --config.generate.num_tokens=64

The model, tokenizer and data come from <workdir>/config.json (research.analysis.routing.load_run);
only config.generate.* is read from the command line. The default samples (temperature 0.8,
top-p 0.95): greedy decoding of a small model tends to repeat its likeliest token (the tiny MoR
run repeats the newline). A continuation with no visible text is shown as its token ids, with
the reason.

Top-p (nucleus) sampling, `sample_top_p`, lives here for now; research/infer/decode.py samples
with a temperature only, so top_p < 1 decodes by prefill and decode_step calls from this module.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tokenizers import Tokenizer

from research.analysis import routing
from research.config import ConfigError
from research.data import tokenizer as tokenizer_lib
from research.infer import decode
from research.model.lm import LanguageModel

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def sample_top_p(logits_BV: Array, key: Array, *, temperature: float, top_p: float) -> Array:
  """One token per row from softmax(logits / temperature) restricted to the nucleus: the
  likeliest tokens whose probabilities, in decreasing order, first reach top_p (always at least
  the likeliest one). temperature 0 is argmax; top_p 1 keeps every token."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  scaled_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1:
    order_BV = jnp.argsort(-scaled_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the likelier tokens
    sorted_BV = jnp.where(mass_before_BV < top_p, sorted_BV, -jnp.inf)
    scaled_BV = jnp.full_like(scaled_BV, -jnp.inf).at[
        jnp.arange(scaled_BV.shape[0])[:, None], order_BV].set(sorted_BV)
  return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)


def sample(model: LanguageModel, prompt_BT: Array, num_tokens: int, *, temperature: float,
           top_p: float, key: Array) -> Array:
  """num_tokens tokens [B, N] after the prompt. Greedy and plain temperature sampling are
  decode.generate; top_p < 1 runs decode.prefill, then decode_step on each sampled token, token i
  sampled with fold_in(key, i) as decode.generate does."""
  if temperature == 0 or top_p >= 1:
    return decode.generate(model, prompt_BT, num_tokens, temperature=temperature,
                           key=key if temperature > 0 else None)
  cache = decode.init_cache(model, prompt_BT.shape[0], prompt_BT.shape[1] + num_tokens)
  logits_BTV, cache = decode.prefill(model, prompt_BT, cache)
  pick = functools.partial(sample_top_p, temperature=temperature, top_p=top_p)
  tokens = [pick(logits_BTV[:, -1], jax.random.fold_in(key, 0))]
  for i in range(1, num_tokens):
    logits_BV, cache = decode.decode_step(model, tokens[-1], cache)
    tokens.append(pick(logits_BV, jax.random.fold_in(key, i)))
  return jnp.stack(tokens, axis=1)


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
  tokens_BN = np.asarray(sample(loaded.model, prompt_BT, g.num_tokens, temperature=g.temperature,
                                top_p=g.top_p, key=jax.random.key(g.seed)))
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
