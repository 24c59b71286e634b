"""Recursive Transformer trained from scratch: Middle-Cycle sharing, Nr = 3 (MoR paper baseline).

  python launch.py --config=configs/recursive.py:tiny --workdir=runs/recursive_tiny
  python launch.py --config=configs/recursive.py:tiny --config.model.recursion.lora_rank=8 ...

The unrolled depth is the preset's, rounded so that (L - 2) divides by Nr (paper App. D: 360M
with Nr=4 uses 34 layers).
"""

import ml_collections as mlc

from configs import base, presets


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = presets.apply(base.get_config(), arg)
  r = c.model.recursion
  r.strategy, r.num_recursions = "middle_cycle", 3
  layers = {"tiny": 5, "small": 8, "135m": 32, "360m": 32}[arg or "tiny"]
  c.model.num_layers = layers
  return c
