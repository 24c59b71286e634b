"""Routed Mixture-of-Experts (docs/moe.md): every FFN replaced by 8 SwiGLU experts, top-2.

  python launch.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python launch.py --config=configs/moe.py:tiny,rmoe --workdir=runs/rmoe_tiny
  python launch.py --config=configs/moe.py:tiny,rexmoe --workdir=runs/rexmoe_tiny
  python launch.py --config=configs/moe.py:360m --config.model.moe.capacity_factor=1.25 ...

Experts are half the dense width (d_ff / 2), so the active FFN compute of top-2 equals the dense
model's (plus a d x 8 router) while the FFN parameters grow 4x. Softmax router with renormalised
top-2 weights (Mixtral), dropless, Switch balancing loss 0.01, router z-loss 1e-3 (ST-MoE). On CPU
`--config.model.moe.impl=dense` is the faster path (shared/specs/jax_anchors.md §2.2).

Variants (`:<preset>,<variant>`):
  rmoe    RMoE's GRU layerwise recurrent router, p = min(128, d / 4) (the paper's p = 128 at
          d = 1280; spec §3.1), full backprop through the layer recurrence.
  rexmoe  ReXMoE R2 (groups of 2 adjacent MoE layers route over 16 experts, top-2) with PSR-Linear
          from 20% to 60% of the preset's steps (the paper's 10k -> 30k of ~50k; spec §4.2).
"""

import ml_collections as mlc

from configs import base, presets

VARIANTS = ("moe", "rmoe", "rexmoe")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, _, variant = (arg or "").partition(",")
  variant = variant or "moe"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} in --config=configs/moe.py:{arg}; "
                     f"choose one of {', '.join(VARIANTS)}")
  c = presets.apply(base.get_config(), preset or None)
  c.model.moe.update(num_experts=8, top_k=2, d_ff=c.model.d_ff // 2, score="softmax",
                     renormalize=True, capacity_factor=0.0, balance_coeff=0.01, z_coeff=1e-3)
  if variant == "rmoe":
    c.model.moe.update(router="gru", gru_dim=min(128, c.model.d_model // 4))
  elif variant == "rexmoe":
    c.model.moe.update(rex_group=2, psr=True, psr_start=c.train.steps // 5,
                       psr_end=3 * c.train.steps // 5)
  return c
