"""config.mode='generate': continue a prompt with a run's newest checkpoint (docs/inference.md).

  python launch.py --config=configs/mor.py:tiny --workdir=runs/mor_tiny --config.mode=generate \
      --config.generate.prompt='ROMEO:' --config.generate.num_tokens=64

  python launch.py ... --config.mode=generate --config.generate.prompts_file=prompts.txt \
      [--config.generate.slots=8 --config.generate.max_len=256]

serves a file of prompts (one per line, blank lines skipped) through the engine
(research/infer/engine.py) with a progress bar, writes <workdir>/generations.jsonl (one record
per prompt) and prints tokens/s and, for MoR, the mean depth.

The model, tokenizer and data come from <workdir>/config.json (research.analysis.routing.load_run);
only config.generate.* is read from the command line. The default samples (temperature 0.8,
top-p 0.95): greedy decoding of a small model tends to repeat its likeliest token (the tiny MoR
run repeats the newline). A continuation with no visible text is shown as its token ids, with
the reason."""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from research.analysis import routing
from research.config import ConfigError
from research.data import tokenizer as tokenizer_lib
from research.infer import decode
from research.infer import engine as engine_lib


def check(g: mlc.ConfigDict) -> None:
  """Raises ConfigError naming the generate key whose value cannot be used."""
  if not 0 < g.top_p <= 1:
    raise ConfigError(f"config.generate.top_p={g.top_p}: must be in (0, 1] (1: no nucleus cut)")


def load(g: mlc.ConfigDict, workdir: str) -> routing.LoadedRun:
  """The run's newest checkpoint, with generate.exit_threshold (when >= 0) as the model's."""
  if g.exit_threshold < 0:
    return routing.load_run(workdir)
  return routing.load_run(workdir, {"recursion.exit_threshold": g.exit_threshold})


def generate_from_checkpoint(cfg: mlc.ConfigDict, workdir: str) -> list[str]:
  """Continues config.generate.prompt num_samples times (one batch) with the newest checkpoint of
  `workdir`, prints each continuation (cut at the first end-of-document token; one with no
  visible text as token ids and why) and returns them. With config.generate.prompts_file, serves
  the file instead (`serve_prompts_file`)."""
  g = cfg.generate
  check(g)
  if g.prompts_file:
    return [r["completion"] for r in serve_prompts_file(cfg, workdir)]
  loaded = load(g, workdir)
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


def read_prompts(path: str) -> list[tuple[int, str]]:
  """(line number, text) of each non-blank line of `path` (its line break dropped)."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  return [(i + 1, line) for i, line in enumerate(lines) if line.strip()]


def serve_prompts_file(cfg: mlc.ConfigDict, workdir: str) -> list[dict]:
  """Serves every prompt of config.generate.prompts_file through the engine (slots, max_len,
  temperature, top_p of config.generate; prompt i samples with key(seed + i) and stops at the
  end-of-document token or after num_tokens), with a progress bar; writes and returns the
  records of <workdir>/generations.jsonl and prints tokens/s and the mean depth (MoR). A prompt
  that does not fit the cache is refused (ConfigError) before anything compiles."""
  g = cfg.generate
  prompts = read_prompts(g.prompts_file)
  if not prompts:
    raise ConfigError(f"config.generate.prompts_file={g.prompts_file!r}: holds no prompt")
  loaded = load(g, workdir)
  tok = loaded.run.tokenizer
  eos = tokenizer_lib.eos_id(tok)
  requests = []
  for i, (line, text) in enumerate(prompts):
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
      raise ConfigError(f"config.generate.prompts_file={g.prompts_file!r}: line {line} encodes "
                        "to no tokens")
    if len(ids) + g.num_tokens > g.max_len:
      raise ConfigError(
          f"config.generate.max_len={g.max_len}: line {line} of {g.prompts_file} has {len(ids)} "
          f"tokens, which with config.generate.num_tokens={g.num_tokens} do not fit the cache")
    requests.append(engine_lib.Request(ids, g.num_tokens, eos=eos, seed=g.seed + i))
  engine = make_engine(g, loaded.model)
  how = "greedy" if g.temperature == 0 else f"temperature {g.temperature}, top-p {g.top_p}"
  print(f"step {loaded.step}: serving {len(requests)} prompts from {g.prompts_file} "
        f"({g.engine} engine, {g.slots} slots of {g.max_len} tokens, up to {g.num_tokens} new "
        f"tokens each, {how})",
        flush=True)
  start = time.perf_counter()
  with tqdm(total=len(requests), unit="prompt", dynamic_ncols=True) as bar:
    done = engine.serve(requests, on_finish=lambda _: bar.update(1))
  seconds = time.perf_counter() - start
  records = []
  for (_, text), c in zip(prompts, done, strict=True):
    records.append({"prompt": text, "completion": continuation(tok, c.tokens),
                    "tokens": c.tokens, "finish": c.finish,
                    "mean_depth": c.mean_depth if engine.routed else None,
                    "time_s": round(c.end_s - c.start_s, 6)})
  path = os.path.join(workdir, "generations.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  total = sum(len(c.tokens) for c in done)
  line = (f"{total} tokens in {seconds:.2f} s: {total / seconds:.1f} tokens/s (compilation "
          f"included)")
  if engine.routed:
    depth = sum(c.depth_sum for c in done) / sum(c.depth_tokens for c in done)
    line += f", mean depth {depth:.3f} of {loaded.model.core.plan.num_recursions}"
  if isinstance(engine, engine_lib.DepthwiseEngine):
    line += (f", {engine.stats['block_rows']} shared-block rows in "
             f"{engine.stats['engine_steps']} engine steps")
  print(f"{line}; wrote {path}", flush=True)
  return records


def make_engine(g: mlc.ConfigDict, model) -> engine_lib.Engine:
  """The engine config.generate.engine names (slots, max_len, sampling of config.generate); a
  model the depth-wise engine cannot serve is a ConfigError naming the model key."""
  kw = dict(slots=g.slots, max_len=g.max_len, temperature=g.temperature, top_p=g.top_p)
  if g.engine == "sequence":
    return engine_lib.Engine(model, **kw)
  try:
    return engine_lib.DepthwiseEngine(model, block_rows=g.block_rows or None, **kw)
  except ValueError as e:
    raise ConfigError(f"config.generate.engine='depthwise': {str(e).split(': ', 1)[1]}") from e


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
