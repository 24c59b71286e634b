"""RRT Table G.2 / Fig. 4: the LoRA rank of the Relaxed Recursive Transformer.

  python launch.py --config=configs/ablations/rrt_rank.py:smollm2_135m --workdir=runs/rank --sweep
  python launch.py --config=configs/ablations/rrt_rank.py:smollm2_135m --workdir=runs/rank --report

Average init with SVD-initialised per-depth LoRA of rank 64 / 128 / 256 / 512 (init=stepwise etc.
after the preset for the other rows of Table G.2). Each matrix's rank is capped at min(in, out)
(recursion.lora_shapes): for SmolLM2-135M k and v (576 -> 192) are at full rank from 256 on, which
the N-emb column of the report shows. Presets and the options nr and strategy are configs/rrt.py's.
"""

import ml_collections as mlc

from configs import rrt
from configs.ablations import rrt_init
from research import sweep

RANKS = (64, 128, 256, 512)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return rrt.get_config(arg)


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  _, options = rrt.parse(arg)
  if "rank" in options:
    raise ValueError(f"rrt_rank:{arg}: the cells set the rank")
  method = options.get("init", "average")
  if method not in rrt_init.METHODS:
    raise ValueError(f"rrt_rank:{arg}: init={method!r} is not one of "
                     f"{', '.join(rrt_init.METHODS)}")
  return [rrt_init.relaxed_cell(method, rank, options) for rank in RANKS]
