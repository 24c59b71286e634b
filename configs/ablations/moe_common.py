"""Shared by the MoE-family sweeps (moe_coe.py, moe_rmoe.py, moe_rexmoe.py): equal training FLOPs
across the cells of a table, two seeds per cell (docs/results/moe.md)."""

import copy

import ml_collections as mlc

from research import sweep
from research.train import flops, loop

SEEDS = (0, 1)


def with_overrides(cfg: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
  cfg = copy.deepcopy(cfg)
  cfg.update_from_flattened_dict(overrides)
  return cfg


def budget_of(cfg: mlc.ConfigDict, overrides: dict) -> float:
  """Training FLOPs (paper convention, research/train/flops.py) of the cell `overrides` of `cfg`
  at the preset's train.steps: the budget every cell of the table spends."""
  c = with_overrides(cfg, overrides)
  per_step = (flops.paper_flops_per_token(c.model, c.data.seq_len) * c.train.batch_size
              * c.data.seq_len)
  return float(per_step * c.train.steps)


def steps_at(cfg: mlc.ConfigDict, overrides: dict, budget: float) -> int:
  """The steps the cell `overrides` of `cfg` trains for on `budget` FLOPs."""
  c = with_overrides(cfg, overrides)
  c.train.flop_budget = budget
  return loop.total_steps(c)


def seeded_cells(rows: list[tuple[str, str, dict]], budget: float) -> list[sweep.Cell]:
  """Each (name, label, overrides) row at `budget` FLOPs, once per seed (sweep.with_seeds):
  runs <name>_seed<k>, grouped under <name> in the report's table over seeds."""
  cells = [sweep.Cell(name, label, dict(overrides, **{"train.flop_budget": budget}))
           for name, label, overrides in rows]
  return sweep.with_seeds(cells, SEEDS)
