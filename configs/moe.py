"""Routed Mixture-of-Experts (docs/moe.md): every FFN replaced by 8 SwiGLU experts, top-2.

  python launch.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python launch.py --config=configs/moe.py:360m --config.model.moe.capacity_factor=1.25 ...
  python launch.py --config=configs/moe.py:tiny,coe --workdir=runs/coe_tiny      # CoE-2
  python launch.py --config=configs/moe.py:tiny,coe=1 --workdir=runs/coe_tiny_moe  # its MoE

Experts are half the dense width (d_ff / 2), so the active FFN compute of top-2 equals the dense
model's (plus a d x 8 router) while the FFN parameters grow 4x. Softmax router with renormalised
top-2 weights (Mixtral), dropless, Switch balancing loss 0.01, router z-loss 1e-3 (ST-MoE). On CPU
`--config.model.moe.impl=dense` is the faster path (shared/specs/jax_anchors.md §2.2).

`arg` is a preset then an option: `coe` (= coe=2) or `coe=C` is the Chain-of-Experts paper's
setting (shared/specs/rrt_coe_rmoe_rexmoe.md §2.2) scaled to the preset: 15 routed experts + 1
shared (the paper: 63 + 1) of width d_ff / 4, top-4/C per iteration (the paper: 8/C, compute
parity), C iterations with independent routers and the official code's wiring
(coe_residual="inner", for every C as in its runs, so coe=1 is the paper's MoE baseline), a
DeepSeek gate (softmax, top-k not renormalised), the sequence-level balance loss at the code's
alpha = 0.001 per gate call summed over layers (balance_coeff = 0.001 x layers, as our loss is a
mean over layers), no z-loss, and the code's optimiser (constant schedule after 10% warm-up,
weight decay 0.01; the preset's learning rate and budget).
"""

import ml_collections as mlc

from configs import base, presets

COE_TOP_K = 4  # top-k of the C=1 baseline; split over the C iterations


def parse(arg: str | None) -> tuple[str, int]:
  """'tiny,coe=2' -> ('tiny', 2); 'tiny,coe' -> ('tiny', 2); 'tiny' -> ('tiny', 0): no CoE."""
  preset, *items = (arg or "tiny").split(",")
  iterations = 0
  for item in items:
    key, eq, value = item.partition("=")
    if key != "coe" or (eq and not value.isdigit()):
      raise ValueError(f"configs/moe.py:{arg}: {item!r} is not coe or coe=C")
    iterations = int(value) if eq else 2
    if iterations < 1 or COE_TOP_K % iterations:
      raise ValueError(f"configs/moe.py:{arg}: C={iterations} must divide {COE_TOP_K}, the "
                       "baseline top-k split over the iterations")
  return preset, iterations


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, coe_iterations = parse(arg)
  c = presets.apply(base.get_config(), preset)
  c.model.moe.update(num_experts=8, top_k=2, d_ff=c.model.d_ff // 2, score="softmax",
                     renormalize=True, capacity_factor=0.0, balance_coeff=0.01, z_coeff=1e-3)
  if coe_iterations:
    c.model.moe.update(num_experts=15, num_shared_experts=1, d_ff=c.model.d_ff // 4,
                       top_k=COE_TOP_K // coe_iterations, iterations=coe_iterations,
                       coe_residual="inner", renormalize=False, balance_scope="sequence",
                       balance_coeff=0.001 * c.model.num_layers, z_coeff=0.0)
    c.train.update(schedule="constant", warmup_fraction=0.1, weight_decay=0.01)
  return c
