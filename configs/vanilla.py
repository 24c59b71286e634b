"""Vanilla Llama-style transformer (the baseline of every table).

  python launch.py --config=configs/vanilla.py:tiny --workdir=runs/vanilla_tiny
"""

import ml_collections as mlc

from configs import base, presets


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return presets.apply(base.get_config(), arg)
