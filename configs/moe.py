"""Routed Mixture-of-Experts (docs/moe.md): every FFN replaced by 8 SwiGLU experts, top-2.

  python launch.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python launch.py --config=configs/moe.py:360m --config.model.moe.capacity_factor=1.25 ...

Experts are half the dense width (d_ff / 2), so the active FFN compute of top-2 equals the dense
model's (plus a d x 8 router) while the FFN parameters grow 4x. Softmax router with renormalised
top-2 weights (Mixtral), dropless, Switch balancing loss 0.01, router z-loss 1e-3 (ST-MoE). On CPU
`--config.model.moe.impl=dense` is the faster path (shared/specs/jax_anchors.md §2.2).
"""

import ml_collections as mlc

from configs import base, presets


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = presets.apply(base.get_config(), arg)
  c.model.moe.update(num_experts=8, top_k=2, d_ff=c.model.d_ff // 2, score="softmax",
                     renormalize=True, capacity_factor=0.0, balance_coeff=0.01, z_coeff=1e-3)
  return c
