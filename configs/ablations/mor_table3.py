"""MoR paper Table 3: Vanilla, Recursive and MoR at equal training FLOPs (docs/methods/mor.md §5.1).

  python launch.py --config=configs/ablations/mor_table3.py:tiny --workdir=runs/table3 --sweep
  python launch.py --config=configs/ablations/mor_table3.py:tiny --workdir=runs/table3 --report

Every cell spends the same budget (paper convention, §4.3), so cheaper models see more tokens:
Vanilla; Recursive middle-cycle Nr = 2/3/4; MoR expert choice Nr = 2/3/4; MoR token choice Nr = 3;
MoR expert choice Nr = 3 with recursive KV sharing. Depths round up so (L - 2) divides by Nr
(360M: 32/32/34 layers for Nr = 2/3/4). Warm-up: 5% of the steps the cell would get at the
smallest budget of the paper's isoFLOP study (2e18 at 135m/360m) by the family's reference
model, reused across the family as the released configs do (360M: 57 for Vanilla and Recursive,
85 for MoR where the paper rounded 85.8 up to 86); decay over the last 20% (WSD).
"""

import ml_collections as mlc

from configs import base, mor, presets
from research import sweep

BUDGET = {"tiny": 6e11, "small": 1.2e14, "135m": 16.5e18, "360m": 16.5e18}
WARMUP_BUDGET = {"tiny": 6e11, "small": 1.2e14, "135m": 2e18, "360m": 2e18}
CELLS = (  # name, Model, Router, KV, Nr
    ("vanilla", "Vanilla", "none", "cache", 1),
    ("recursive_nr2", "Recursive", "none", "cache", 2),
    ("recursive_nr3", "Recursive", "none", "cache", 3),
    ("recursive_nr4", "Recursive", "none", "cache", 4),
    ("mor_expert_nr2", "MoR", "expert", "cache", 2),
    ("mor_expert_nr3", "MoR", "expert", "cache", 3),
    ("mor_expert_nr4", "MoR", "expert", "cache", 4),
    ("mor_token_nr3", "MoR", "token", "cache", 3),
    ("mor_expert_share_nr3", "MoR", "expert", "share", 3),
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return mor.get_config(arg)


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in BUDGET:
    raise ValueError(f"mor_table3 has no sweep for preset {preset!r}; "
                     f"choose one of {', '.join(BUDGET)}")
  base_layers = presets.MODELS[preset][1]  # the vanilla depth; recursive cells round up
  vanilla = presets.apply(base.get_config(), preset)
  warmup = {family: sweep.isoflop_warmup(ref, WARMUP_BUDGET[preset])
            for family, ref in (("none", vanilla), ("mor", get_config(preset)))}
  cells = []
  for name, model, kind, kv, nr in CELLS:
    depth = base_layers if nr == 1 else mor.mor_depth(base_layers, nr)
    overrides = {
        "model.num_layers": depth, "model.recursion.num_recursions": nr,
        "model.recursion.strategy": "none" if nr == 1 else "middle_cycle",
        "model.mor.kind": kind, "model.mor.kv": kv,
        "model.mor.z_coeff": 1e-5 if kind == "token" else 0.0,
        "train.flop_budget": BUDGET[preset],
        "train.warmup_steps": warmup["none" if kind == "none" else "mor"]}
    router = {"none": "-", "expert": "Expert", "token": "Token"}[kind]
    kv_name = "-" if kind == "none" else kv.capitalize()
    share = "-" if nr == 1 else "M-Cyc"
    label = f"{model} | {router} | {kv_name} | {share} | Nr={nr} | L={depth}"
    cells.append(sweep.Cell(name=name, label=label, overrides=overrides))
  return cells
