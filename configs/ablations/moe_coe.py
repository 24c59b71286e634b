"""Chain-of-Experts paper §4 (Table 3) at equal training FLOPs: MoE vs CoE, width, residual wiring
and the independent gate.

  python launch.py --config=configs/ablations/moe_coe.py:tiny --workdir=runs/moe_coe --sweep
  python launch.py --config=configs/ablations/moe_coe.py:tiny --workdir=runs/moe_coe --report

The base is configs/moe.py:<preset>,coe (15 routed + 1 shared experts of width d_ff / 4, the
official code's wiring `inner`, DeepSeek gate, sequence-level balance loss). The paper's top-k
are halved with its 63 -> 15 experts (our preset: MoE K = 4 is the paper's K = 8):

  moe_k4            MoE K = 4                    (paper: MoE K = 8)
  coe_c2k2          CoE C = 2, K = 2 / iteration (paper: C = 2, K = 4; the compute of moe_k4)
  coe_c2k4          CoE C = 2, K = 4             (paper: C = 2, K = 8; twice the compute)
  moe_k8            MoE K = 8, "width"           (paper: K = 16; the compute of coe_c2k4)
  coe_c2k2_outer, coe_c2k2_inner_outer   the residual variants (coe_residual)
  coe_c2k2_noig     one router for both iterations (the code's use_igate=False, inner_outer as
                    its -noig run)

Every cell spends the FLOPs moe_k4 spends in the preset's train.steps (tiny: 300 steps), so the
cells with more active compute per token train for fewer steps; two seeds per cell.
"""

import ml_collections as mlc

from configs import moe
from configs.ablations import moe_common
from research import sweep

PRESETS = ("tiny", "small", "135m", "360m")
ROWS = (  # name, label, model.moe overrides
    ("moe_k4", "MoE K=4 (paper K=8)", dict(iterations=1, top_k=4)),
    ("coe_c2k2", "CoE C=2 K=2 (paper C=2 K=4)", dict(iterations=2, top_k=2)),
    ("coe_c2k4", "CoE C=2 K=4 (paper C=2 K=8)", dict(iterations=2, top_k=4)),
    ("moe_k8", "MoE K=8, width (paper K=16)", dict(iterations=1, top_k=8)),
    ("coe_c2k2_outer", "CoE C=2 K=2, outer residual", dict(iterations=2, top_k=2,
                                                            coe_residual="outer")),
    ("coe_c2k2_inner_outer", "CoE C=2 K=2, inner + outer residual",
     dict(iterations=2, top_k=2, coe_residual="inner_outer")),
    ("coe_c2k2_noig", "CoE C=2 K=2, no independent gate",
     dict(iterations=2, top_k=2, coe_residual="inner_outer", coe_shared_router=True)),
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return moe.get_config(f"{arg or 'tiny'},coe")


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"moe_coe has no sweep for preset {preset!r}; choose one of "
                     f"{', '.join(PRESETS)}")
  rows = [(name, label, {f"model.moe.{k}": v for k, v in keys.items()})
          for name, label, keys in ROWS]
  budget = moe_common.budget_of(get_config(preset), rows[0][2])
  return moe_common.seeded_cells(rows, budget)
