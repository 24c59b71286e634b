"""RMoE paper Table 1 at equal training FLOPs: the router of a top-2 MoE, linear vs MLP (SMoE-MLP)
vs GRU (RMoE) vs GRU without recurrence (RMoE-NP), and Table 4's detached recurrence; Mixtral's
balance loss pooled over layers, as RMoE's training computes it (model.moe.balance_form="mixtral").

  python launch.py --config=configs/ablations/moe_rmoe.py:tiny --workdir=runs/moe_rmoe --sweep
  python launch.py --config=configs/ablations/moe_rmoe.py:tiny --workdir=runs/moe_rmoe --report

The base is configs/moe.py:<preset>,rmoe (8 experts, top-2, GRU p = min(128, d / 4)); the MLP
router's hidden width is 2 p (model.moe.router_mlp_dim=-1: the width that fits the paper's 0.75M
enwik8 router parameters, docs/moe.md). The router statistics of the paper (Inner / Outer
Balance, gate entropy, cross-layer mutual information of the expert choices) come from
research/analysis/moe_routing.py on each cell's checkpoint (notebooks/moe_routing.ipynb). Every
cell spends the FLOPs of the linear router in the preset's train.steps (tiny: 300 steps); two
seeds per cell.
"""

import ml_collections as mlc

from configs import moe
from configs.ablations import moe_common
from research import sweep

PRESETS = ("tiny", "small", "135m", "360m")
ROWS = (  # name, label, model.moe overrides
    ("linear", "Linear router", dict(router="linear")),
    ("mlp", "MLP router (SMoE-MLP)", dict(router="mlp")),
    ("gru", "GRU router (RMoE)", dict(router="gru", gru_recurrence="full")),
    ("gru_np", "GRU, no recurrence (RMoE-NP)", dict(router="gru", gru_recurrence="none")),
    ("gru_detach", "GRU, detached recurrence", dict(router="gru", gru_recurrence="detach")),
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = moe.get_config(f"{arg or 'tiny'},rmoe")
  c.model.moe.balance_form = "mixtral"
  return c


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"moe_rmoe has no sweep for preset {preset!r}; choose one of "
                     f"{', '.join(PRESETS)}")
  rows = [(name, label, {f"model.moe.{k}": v for k, v in keys.items()})
          for name, label, keys in ROWS]
  budget = moe_common.budget_of(get_config(preset), rows[0][2])
  return moe_common.seeded_cells(rows, budget)
