"""MoR paper Table 10: parameter-sharing strategies of Recursive Transformers (no routing).

  python launch.py --config=configs/ablations/mor_sharing.py:tiny --workdir=runs/sharing --sweep
  python launch.py --config=configs/ablations/mor_sharing.py:tiny --workdir=runs/sharing --report
  python launch.py --config=configs/ablations/mor_sharing.py:tiny_l8 --workdir=runs/sharing8 --sweep

Vanilla at full, 1/2 and 1/3 depth, then Cycle / Sequence / Middle-Cycle / Middle-Sequence with
Nr = 2 and 3, a fixed token budget (10B tokens at 135m/360m) with cosine decay to 10%
(docs/methods/mor.md §1.2, §5.4). As in Table 10 the unrolled depth rounds *down* to a valid one
(360M Nr=3: Cycle 30 layers, Middle-Cycle 1+10x3+1 = 32; 135M Nr=3: Middle-Cycle 1+9x3+1 = 29).
`tiny_l8` is the tiny shape at 8 layers instead of 4: at 4, Middle-Cycle and Middle-Sequence are
one model at Nr = 2 and 3 (one shared layer), and so are Cycle and Sequence at Nr = 3; at 8 every
recursive cell has its own layer order.
"""

import ml_collections as mlc

from configs import presets
from configs.ablations import mor_routers
from research import sweep

SHORT = {"cycle": "Cyc", "sequence": "Seq", "middle_cycle": "M-Cyc", "middle_sequence": "M-Seq"}


DEEPER = {"tiny_l8": ("tiny", 8)}  # arg -> (preset, unrolled depth L)


def _preset_and_layers(arg: str | None) -> tuple[str, int]:
  """(preset, L): a preset at its own depth, or a DEEPER variant."""
  arg = arg or "tiny"
  if arg in DEEPER:
    return DEEPER[arg]
  if arg not in mor_routers.STEPS:
    raise ValueError(f"mor_sharing has no sweep for preset {arg!r}; "
                     f"choose one of {', '.join([*mor_routers.STEPS, *DEEPER])}")
  return arg, presets.MODELS[arg][1]


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, layers = DEEPER.get(arg, (arg, None))
  c = mor_routers.get_config(preset)
  c.model.mor.kind = "none"
  if layers is not None:
    c.model.num_layers = layers
  return c


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  _, layers = _preset_and_layers(arg)
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
