"""config.mode='generate': continue a prompt with a run's newest checkpoint (docs/inference.md).

  python launch.py --config=configs/mor.py:tiny --workdir=runs/mor_tiny --config.mode=generate \
      --config.generate.prompt='ROMEO:' --config.generate.num_tokens=64

The model, tokenizer and data come from <workdir>/config.json (research.analysis.routing.load_run);
only config.generate.* is read from the command line.
"""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tokenizers import Tokenizer

from research.analysis import routing
from research.config import ConfigError
from research.data import tokenizer as tokenizer_lib
from research.infer import decode


def generate_from_checkpoint(cfg: mlc.ConfigDict, workdir: str) -> list[str]:
  """Continues config.generate.prompt num_samples times (one batch) with the newest checkpoint of
  `workdir`, prints each continuation (cut at the first end-of-document token) and returns them."""
  g = cfg.generate
  loaded = routing.load_run(workdir)
  tok = loaded.run.tokenizer
  ids = tok.encode(g.prompt, add_special_tokens=False).ids
  if not ids:
    raise ConfigError(f"config.generate.prompt={g.prompt!r}: encodes to no tokens")
  prompt_BT = jnp.asarray([ids] * g.num_samples, jnp.int32)
  key = jax.random.key(g.seed) if g.temperature > 0 else None
  tokens_BN = np.asarray(decode.generate(loaded.model, prompt_BT, g.num_tokens,
                                         temperature=g.temperature, key=key))
  texts = [continuation(tok, row) for row in tokens_BN.tolist()]
  how = "greedy" if g.temperature == 0 else f"temperature {g.temperature}, seed {g.seed}"
  print(f"step {loaded.step}: {g.num_tokens} tokens after a {len(ids)}-token prompt, {how}",
        flush=True)
  for i, text in enumerate(texts):
    print(f"[{i}] {g.prompt}{text}", flush=True)
  return texts


def continuation(tok: Tokenizer, tokens: list[int]) -> str:
  """The text of generated tokens up to the first end-of-document token (the document ends)."""
  eos = tokenizer_lib.eos_id(tok)
  return tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)
