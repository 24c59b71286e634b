"""RRT Table F.1 / Fig. 6: how the shared layers are initialised from the pretrained model.

  python launch.py --config=configs/ablations/rrt_init.py:smollm2_135m --workdir=runs/init --sweep
  python launch.py --config=configs/ablations/rrt_init.py:smollm2_135m --workdir=runs/init --report

Stepwise / Average / Lower / Random (docs/rrt.md), each as the plain Recursive Transformer (rank 0)
and relaxed with SVD-initialised per-depth LoRA (rank 64, or rank=N after the preset), uptrained
with the recipe of configs/rrt.py. The argument is configs/rrt.py's: a preset (smollm2_135m, the
paper-like uptraining; smollm2_135m_short, a CPU-sized one; or a size preset with
--config.model.init_from=PATH) then the options nr, strategy (default cycle, the paper's) and rank.
"""

import ml_collections as mlc

from configs import rrt
from research import sweep

METHODS = {"stepwise": "Stepwise", "average": "Average", "lower": "Lower", "random": "Random"}
SHORT = {"cycle": "Cyc", "sequence": "Seq", "middle_cycle": "M-Cyc", "middle_sequence": "M-Seq"}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return rrt.get_config(arg)


def block(options: dict) -> str:
  """'Cyc Nr=2': the looping block of the table's rows."""
  return f"{SHORT[options.get('strategy', 'cycle')]} Nr={options.get('nr', 2)}"


def relaxed_cell(method: str, rank: int, options: dict) -> sweep.Cell:
  """The cell of `method` with per-depth LoRA of `rank` (0: the plain recursive model)."""
  kind, lora = ("Relaxed", "SVD") if rank else ("Recursive", "-")
  name = f"{method}_r{rank}_svd" if rank else f"{method}_r0"
  return sweep.Cell(
      name=name, label=f"{kind} | {block(options)} | {METHODS[method]} | {lora} | r={rank}",
      overrides={"model.recursion.init": method, "model.recursion.lora_rank": rank,
                 "model.recursion.lora_init": "svd"})


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  _, options = rrt.parse(arg)
  if "init" in options or options.get("rank", 64) <= 0:
    raise ValueError(f"rrt_init:{arg}: the cells set the init method; rank=N (> 0) is the "
                     "rank of the relaxed cells")
  rank = options.get("rank", 64)
  return ([relaxed_cell(m, 0, options) for m in METHODS]
          + [relaxed_cell(m, rank, options) for m in METHODS])
