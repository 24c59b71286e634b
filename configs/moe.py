"""Routed Mixture-of-Experts (docs/moe.md): every FFN replaced by 8 SwiGLU experts, top-2.

  python launch.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python launch.py --config=configs/moe.py:tiny,rmoe --workdir=runs/rmoe_tiny
  python launch.py --config=configs/moe.py:tiny,rexmoe --workdir=runs/rexmoe_tiny
  python launch.py --config=configs/moe.py:tiny,coe --workdir=runs/coe_tiny      # CoE-2
  python launch.py --config=configs/moe.py:tiny,coe=1 --workdir=runs/coe_tiny_moe  # its MoE
  python launch.py --config=configs/moe.py:360m --config.model.moe.capacity_factor=1.25 ...

Experts are half the dense width (d_ff / 2), so the active FFN compute of top-2 equals the dense
model's (plus a d x 8 router) while the FFN parameters grow 4x. Softmax router with renormalised
top-2 weights (Mixtral), dropless, Switch balancing loss 0.01, router z-loss 1e-3 (ST-MoE). On CPU
`--config.model.moe.impl=dense` is the faster path (docs/moe.md: ragged_dot is masked dense there).

`arg` is a preset, then optionally one variant (`:<preset>,<variant>`, `parse`):
  moe     the MoE above (the default).
  rmoe    RMoE's GRU layerwise recurrent router, p = min(128, d / 4) (the paper's p = 128 at
          d = 1280; spec §3.1), full backprop through the layer recurrence.
  rexmoe  ReXMoE R2 (groups of 2 adjacent MoE layers route over 16 experts, top-2) with PSR-Linear
          from 20% to 60% of the preset's steps (the paper's 10k -> 30k of ~50k; spec §4.2).
  coe, coe=C  the Chain-of-Experts paper's setting (docs/methods/rrt_coe_rmoe_rexmoe.md §2.2)
          scaled to the preset (`coe` = coe=2): 15 routed experts + 1 shared (the paper: 63 + 1)
          of width d_ff / 4, top-4/C per iteration (the paper: 8/C, compute parity), C iterations
          with independent routers and the official code's wiring (coe_residual="inner", for every
          C as in its runs, so coe=1 is the paper's MoE baseline), a DeepSeek gate (softmax, top-k
          not renormalised), the sequence-level balance loss at the code's alpha = 0.001 per gate
          call summed over layers (balance_coeff = 0.001 x layers, as our loss is a mean over
          layers), no z-loss, and the code's optimiser (constant schedule after 10% warm-up,
          weight decay 0.01; the preset's learning rate and budget).
"""

import ml_collections as mlc

from configs import base, presets

VARIANTS = ("moe", "rmoe", "rexmoe", "coe", "coe=C")
COE_TOP_K = 4  # top-k of the C=1 baseline; split over the C iterations


def parse(arg: str | None) -> tuple[str, str, int]:
  """'tiny' -> ('tiny', 'moe', 0); 'tiny,rmoe' -> ('tiny', 'rmoe', 0); 'tiny,coe' -> ('tiny',
  'coe', 2); 'tiny,coe=C' -> ('tiny', 'coe', C): (preset, variant, CoE iterations or 0)."""
  preset, *options = (arg or "tiny").split(",")
  if len(options) > 1:
    raise ValueError(f"configs/moe.py:{arg}: one variant at most, one of {', '.join(VARIANTS)}")
  variant, eq, value = (options[0] if options else "moe").partition("=")
  if variant not in ("moe", "rmoe", "rexmoe", "coe") or (eq and (variant != "coe"
                                                                 or not value.isdigit())):
    raise ValueError(f"configs/moe.py:{arg}: {options[0]!r} is not a variant; choose one of "
                     f"{', '.join(VARIANTS)}")
  if variant != "coe":
    return preset, variant, 0
  iterations = int(value) if eq else 2
  if iterations < 1 or COE_TOP_K % iterations:
    raise ValueError(f"configs/moe.py:{arg}: C={iterations} must divide {COE_TOP_K}, the "
                     "baseline top-k split over the iterations")
  return preset, variant, iterations


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, variant, coe_iterations = parse(arg)
  c = presets.apply(base.get_config(), preset)
  c.model.moe.update(num_experts=8, top_k=2, d_ff=c.model.d_ff // 2, score="softmax",
                     renormalize=True, capacity_factor=0.0, balance_coeff=0.01, z_coeff=1e-3)
  if variant == "rmoe":
    c.model.moe.update(router="gru", gru_dim=min(128, c.model.d_model // 4))
  elif variant == "rexmoe":
    c.model.moe.update(rex_group=2, psr=True, psr_start=c.train.steps // 5,
                       psr_end=3 * c.train.steps // 5)
  elif variant == "coe":
    c.model.moe.update(num_experts=15, num_shared_experts=1, d_ff=c.model.d_ff // 4,
                       top_k=COE_TOP_K // coe_iterations, iterations=coe_iterations,
                       coe_residual="inner", renormalize=False, balance_scope="sequence",
                       balance_coeff=0.001 * c.model.num_layers, z_coeff=0.0)
    c.train.update(schedule="constant", warmup_fraction=0.1, weight_decay=0.01)
  return c
