"""Depth at equal compute: vanilla transformers of two depths trained on the same FLOP budgets.

  python launch.py --config=configs/ablations/vanilla_depth.py:tiny --workdir=runs/vanilla_depth \
      --sweep
  python launch.py --config=configs/ablations/vanilla_depth.py:tiny --workdir=runs/vanilla_depth \
      --report

The paper's isoFLOP protocol (docs/methods/mor.md §4.2-4.3): steps = budget / (paper FLOPs per
token x tokens per step), WSD schedule with the warm-up fixed at 5% of the steps of the smallest
budget and the decay over the last 20% of each run. At 135m/360m the full-depth cells are the
Vanilla rows of the paper's Table 9 (2e18, 5e18, 16.5e18 FLOPs); the half-depth cells are ours.
"""

import ml_collections as mlc

from configs import vanilla
from research import sweep

DEPTHS = {"tiny": (2, 4), "small": (4, 8), "135m": (15, 30), "360m": (16, 32)}
BUDGETS = {  # total training FLOPs, paper convention
    "tiny": (6e11,),  # 4 layers: 159 steps, 2 layers: 319 steps (a few minutes on 2 CPU cores)
    "small": (1.2e14,),
    "135m": (2e18, 5e18, 16.5e18),
    "360m": (2e18, 5e18, 16.5e18),
}
NAMES = {"tiny": "Tiny", "small": "Small", "135m": "135M", "360m": "360M"}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return vanilla.get_config(arg)


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in DEPTHS:
    raise ValueError(f"vanilla_depth has no sweep for preset {preset!r}; "
                     f"choose one of {', '.join(DEPTHS)}")
  cells = []
  for budget in BUDGETS[preset]:
    for layers in DEPTHS[preset]:
      cfg = get_config(preset)
      cfg.model.num_layers = layers
      flop_name = (f"{budget / 1e18:g}e18" if budget >= 1e18  # as the paper writes it: 16.5e18
                   else f"{budget:.3g}".replace("e+", "e"))
      cells.append(sweep.Cell(
          name=f"L{layers}_{flop_name}",
          label=f"Vanilla {NAMES[preset]}, {layers} layers, {flop_name} FLOPs",
          overrides={"model.num_layers": layers, "train.flop_budget": budget,
                     "train.warmup_steps": sweep.isoflop_warmup(cfg, min(BUDGETS[preset]))}))
  return cells
