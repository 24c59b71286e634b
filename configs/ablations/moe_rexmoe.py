"""ReXMoE paper Tables 4-7 at equal training FLOPs: the reuse factor R (experts pooled over R
adjacent MoE layers) and Progressive Scaling Routing, PSR-Linear and Table 5's PSR-Stepwise.

  python launch.py --config=configs/ablations/moe_rexmoe.py:tiny --workdir=runs/moe_rexmoe --sweep
  python launch.py --config=configs/ablations/moe_rexmoe.py:tiny --workdir=runs/moe_rexmoe --report

The base is configs/moe.py:<preset>,rexmoe (8 experts per layer, top-2, PSR-Linear from 20% to 60%
of each cell's steps). R must divide the MoE layers: the tiny preset has 4, so R8 exists only
from `small` (8 layers) on. The row r1_psr_linear is the control the paper lacks: PSR-Linear on a
plain MoE, the routable experts growing from N/2 to N (model.moe.psr_start_experts), which tells
the schedule's own effect from the reuse's. Every cell spends the FLOPs of R1 in the preset's
train.steps (tiny: 300 steps); two seeds per cell.
"""

import ml_collections as mlc

from configs import moe
from configs.ablations import moe_common
from research import sweep

LAYERS = {"tiny": 4, "small": 8, "135m": 30, "360m": 32}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return moe.get_config(f"{arg or 'tiny'},rexmoe")


def rows_for(preset: str) -> list[tuple[str, str, dict]]:
  """(name, label, model.moe overrides): R1 without and with PSR-Linear from N/2 to N (N the
  preset's experts per layer), then each R dividing the layers with PSR-Linear, PSR-Stepwise and
  without PSR (reuse only)."""
  n = get_config(preset).model.moe.num_experts
  rows = [("r1", "R1 (plain MoE)", dict(rex_group=1, psr=False)),
          ("r1_psr_linear", "R1, PSR-Linear from N/2 to N (control)",
           dict(rex_group=1, psr=True, psr_start_experts=n // 2))]
  for r in (2, 4, 8):
    if LAYERS[preset] % r == 0:
      rows += [(f"r{r}_psr_linear", f"R{r}, PSR-Linear", dict(rex_group=r, psr=True)),
               (f"r{r}_psr_stepwise", f"R{r}, PSR-Stepwise",
                dict(rex_group=r, psr=True, psr_schedule="stepwise")),
               (f"r{r}_no_psr", f"R{r}, no PSR (reuse only)", dict(rex_group=r, psr=False))]
  return rows


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in LAYERS:
    raise ValueError(f"moe_rexmoe has no sweep for preset {preset!r}; choose one of "
                     f"{', '.join(LAYERS)}")
  cfg = get_config(preset)
  rows = [(name, label, {f"model.moe.{k}": v for k, v in keys.items()})
          for name, label, keys in rows_for(preset)]
  budget = moe_common.budget_of(cfg, rows[0][2])
  for _, _, overrides in rows:  # PSR from 20% to 60% of the cell's own steps
    steps = moe_common.steps_at(cfg, overrides, budget)
    overrides.update({"model.moe.psr_start": steps // 5, "model.moe.psr_end": 3 * steps // 5})
  return moe_common.seeded_cells(rows, budget)
