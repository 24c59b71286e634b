"""launch.py --config.mode=generate on a tiny trained MoR run (docs/inference.md)."""

import jax.numpy as jnp
import numpy as np

from research.analysis import routing
from research.infer import decode, generate
from tests import launch_util


def test_launch_generate_prints_the_checkpoints_greedy_continuation(tmp_path):
  """A 4-step expert-choice MoR run (trained with top-k; decoding routes by threshold)."""
  launcher = launch_util.Launcher(tmp_path / "shared", config="configs/mor.py:tiny")
  workdir = tmp_path / "run"
  result = launcher.run(workdir, {"model.num_layers": 5, "train.steps": 4})
  assert result.returncode == 0, result.stderr
  result = launcher.run(workdir, {"mode": "generate", "model.num_layers": 5,
                                  "generate.prompt": "KING", "generate.num_tokens": 6,
                                  "generate.num_samples": 2})
  assert result.returncode == 0, result.stderr
  header, first, second = result.stdout.strip().split("\n")[-3:]
  loaded = routing.load_run(str(workdir))
  tok = loaded.run.tokenizer
  ids = tok.encode("KING", add_special_tokens=False).ids
  assert header == f"step 4: 6 tokens after a {len(ids)}-token prompt, greedy"
  out_N = np.asarray(decode.generate(loaded.model, jnp.asarray([ids]), 6))[0]
  text = generate.continuation(tok, out_N.tolist())
  assert (first, second) == (f"[0] KING{text}", f"[1] KING{text}")
