"""The MoE-family sweeps (configs/ablations/moe_coe.py, moe_rmoe.py, moe_rexmoe.py): every cell
validates, two seeds per row, one FLOP budget per table, and the cells vary what their labels
say (nothing is trained here)."""

import pytest

from configs.ablations import moe_coe, moe_rexmoe, moe_rmoe
from research import sweep
from research.train import loop


@pytest.mark.parametrize("module", [moe_coe, moe_rmoe, moe_rexmoe], ids=lambda m: m.__name__)
def test_cells_validate_with_two_seeds_and_one_budget(module):
  cells = module.get_sweep("tiny")
  cfgs = sweep.cell_configs(module.get_config("tiny"), cells, "/tmp/w", "s", ())
  assert len({c.train.flop_budget for c in cfgs}) == 1
  rows = {}
  for cell, cfg in zip(cells, cfgs, strict=True):
    assert cell.name == f"{cell.group}_seed{cfg.seed}"
    rows.setdefault(cell.group, []).append(cfg.seed)
    assert 100 < loop.total_steps(cfg) <= cfg.train.steps  # the first row: the preset's steps
  assert all(sorted(seeds) == [0, 1] for seeds in rows.values())
  assert loop.total_steps(cfgs[0]) == cfgs[0].train.steps


def by_name(module) -> dict:
  cells = module.get_sweep("tiny")
  cfgs = sweep.cell_configs(module.get_config("tiny"), cells, "/tmp/w", "s", ())
  return {cell.name: cfg for cell, cfg in zip(cells, cfgs, strict=True)}


def test_cells_set_what_the_tables_vary():
  coe = by_name(moe_coe)
  assert (coe["moe_k4_seed0"].model.moe.iterations, coe["moe_k4_seed0"].model.moe.top_k) == (1, 4)
  c2k2 = coe["coe_c2k2_seed1"].model.moe
  assert (c2k2.iterations, c2k2.top_k) == (2, 2)
  assert coe["coe_c2k2_noig_seed0"].model.moe.coe_shared_router
  rmoe = by_name(moe_rmoe)
  assert rmoe["linear_seed0"].model.moe.router == "linear"
  assert rmoe["gru_np_seed0"].model.moe.gru_recurrence == "none"
  assert all(c.model.moe.balance_form == "mixtral" for c in rmoe.values())
  rex = by_name(moe_rexmoe)
  assert sorted({c.model.moe.rex_group for c in rex.values()}) == [1, 2, 4]  # R8: 4 layers
  r2 = rex["r2_psr_linear_seed0"]
  steps = loop.total_steps(r2)
  assert r2.model.moe.psr and (r2.model.moe.psr_start, r2.model.moe.psr_end) == (
      steps // 5, 3 * steps // 5)
  assert not rex["r2_no_psr_seed0"].model.moe.psr
  assert rmoe["mlp_seed1"].model.moe.router == "mlp" and len(rmoe) == 2 * 5
  assert len(rex) == 2 * (2 + 3 * 2)  # r1, r1_psr_linear; R2, R4 x (linear, stepwise, no PSR)
  for name, (r, schedule, first) in {"r1_psr_linear_seed0": (1, "linear", 4),
                                     "r2_psr_stepwise_seed1": (2, "stepwise", -1),
                                     "r4_psr_stepwise_seed0": (4, "stepwise", -1)}.items():
    c = rex[name].model.moe
    steps = loop.total_steps(rex[name])
    assert c.psr and (c.rex_group, c.psr_schedule, c.psr_start_experts) == (r, schedule, first)
    assert (c.psr_start, c.psr_end) == (steps // 5, 3 * steps // 5)
  assert rex["r2_psr_linear_seed0"].model.moe.psr_schedule == "linear"
  assert 8 in {int(c.name[1]) for c in moe_rexmoe.get_sweep("small") if c.name[1].isdigit()}
