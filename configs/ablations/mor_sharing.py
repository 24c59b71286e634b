"""MoR paper Table 10: parameter-sharing strategies of Recursive Transformers (no routing).

  python launch.py --config=configs/ablations/mor_sharing.py:tiny --workdir=runs/sharing --sweep
  python launch.py --config=configs/ablations/mor_sharing.py:tiny --workdir=runs/sharing --report

Vanilla at full, 1/2 and 1/3 depth, then Cycle / Sequence / Middle-Cycle / Middle-Sequence with
Nr = 2 and 3, a fixed token budget (10B tokens at 135m/360m) with cosine decay to 10%
(docs/methods/mor.md §1.2, §5.4). As in Table 10 the unrolled depth rounds *down* to a valid one
(360M Nr=3: Cycle 30 layers, Middle-Cycle 1+10x3+1 = 32; 135M Nr=3: Middle-Cycle 1+9x3+1 = 29).
"""

import ml_collections as mlc

from configs import presets
from configs.ablations import mor_routers
from research import sweep

SHORT = {"cycle": "Cyc", "sequence": "Seq", "middle_cycle": "M-Cyc", "middle_sequence": "M-Seq"}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = mor_routers.get_config(arg)
  c.model.mor.kind = "none"
  return c


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in mor_routers.STEPS:
    raise ValueError(f"mor_sharing has no sweep for preset {preset!r}; "
                     f"choose one of {', '.join(mor_routers.STEPS)}")
  layers = presets.MODELS[preset][1]
  cells = []
  for div in (1, 2, 3):
    depth = max(1, layers // div)
    cells.append(sweep.Cell(
        name=f"vanilla_L{depth}", label=f"Vanilla | - | L={depth}",
        overrides={"model.num_layers": depth, "model.recursion.strategy": "none",
                   "model.recursion.num_recursions": 1}))
  for nr in (2, 3):
    for strategy, short in SHORT.items():
      fixed = 2 if strategy.startswith("middle") else 0
      depth = max(layers - (layers - fixed) % nr, fixed + nr)  # largest valid depth <= L
      cells.append(sweep.Cell(
          name=f"{strategy}_nr{nr}", label=f"Recursive | {short} Nr={nr} | L={depth}",
          overrides={"model.num_layers": depth, "model.recursion.strategy": strategy,
                     "model.recursion.num_recursions": nr}))
  return cells
