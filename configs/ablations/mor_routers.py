"""MoR paper Tables 13 and 14 (Table 4 is their subset): expert- and token-choice router designs.

  python launch.py --config=configs/ablations/mor_routers.py:tiny --workdir=runs/routers --sweep
  python launch.py --config=configs/ablations/mor_routers.py:tiny --workdir=runs/routers --report

MoR Nr = 3, middle-cycle, recursion-wise caching, a fixed token budget (10B tokens at 135m/360m,
the preset's steps below) with cosine decay to 10% (docs/methods/mor.md §4.2, §5.2-5.3). Watch
mor/threshold_acc (Table 13 "Samp-Acc"), mor/depth_frac (dead tokens: depth 0 or stuck at 1),
mor/maxvio and mor/entropy (Table 14). The random-router rows are not reproduced. The capacity
warm-up length of Table 13's "Warmup" row is not stated in the paper: 20% of the run here.
"""

import ml_collections as mlc

from configs import mor
from research import sweep

STEPS = {"tiny": 300, "small": 2000, "135m": 4768, "360m": 4768}  # 4768 x 2M tokens = 10B
EXPERT = (  # name, sampling, coeff, func, alpha, arch, warm-up, z-loss
    ("aux_router_sigmoid_a0.1_mlp", "aux_router", 0.0, "sigmoid", 0.1, "mlp", False, False),
    ("aux_router_tanh_a0.1_mlp", "aux_router", 0.0, "tanh", 0.1, "mlp", False, False),
    ("aux_loss0.01_none_mlp", "aux_loss", 0.01, "none", 1.0, "mlp", False, False),
    ("aux_loss0.01_sigmoid_a0.1_mlp", "aux_loss", 0.01, "sigmoid", 0.1, "mlp", False, False),
    ("aux_loss0.01_sigmoid_a1_mlp", "aux_loss", 0.01, "sigmoid", 1.0, "mlp", False, False),
    ("aux_loss0.01_tanh_a0.1_mlp", "aux_loss", 0.01, "tanh", 0.1, "mlp", False, False),
    ("aux_loss0.1_sigmoid_a0.1_mlp", "aux_loss", 0.1, "sigmoid", 0.1, "mlp", False, False),
    ("aux_loss0.001_sigmoid_a0.1_mlp", "aux_loss", 0.001, "sigmoid", 0.1, "mlp", False, False),
    ("aux_loss0.001_tanh_a0.1_mlp", "aux_loss", 0.001, "tanh", 0.1, "mlp", False, False),
    ("aux_loss0.001_sigmoid_a0.1_linear", "aux_loss", 0.001, "sigmoid", 0.1, "linear", False,
     False),  # the final design
    ("aux_loss0.001_sigmoid_a0.1_wide_mlp", "aux_loss", 0.001, "sigmoid", 0.1, "wide_mlp", False,
     False),
    ("aux_loss0.001_sigmoid_a0.1_linear_warmup", "aux_loss", 0.001, "sigmoid", 0.1, "linear",
     True, False),
    ("aux_loss0.001_sigmoid_a0.1_linear_z", "aux_loss", 0.001, "sigmoid", 0.1, "linear", False,
     True),
)
FINAL_EXPERT = "aux_loss0.001_sigmoid_a0.1_linear"  # the paper's chosen designs: --report pairs
FINAL_TOKEN = "loss0.1_softmax_linear"  # every cell of its table with it, seed by seed
TOKEN = (  # name, balancing, coeff (loss weight or bias rate u), func, alpha, arch, z-loss
    ("loss0.1_softmax_mlp_z", "loss", 0.1, "softmax", 1.0, "mlp", True),
    ("loss0.01_softmax_mlp_z", "loss", 0.01, "softmax", 1.0, "mlp", True),
    ("loss_free0.01_softmax_mlp_z", "loss_free", 0.01, "softmax", 1.0, "mlp", True),
    ("loss_free0.01_sigmoid_a0.1_mlp_z", "loss_free", 0.01, "sigmoid", 0.1, "mlp", True),
    ("loss_free0.001_softmax_mlp_z", "loss_free", 0.001, "softmax", 1.0, "mlp", True),
    ("loss0.1_softmax_linear_z", "loss", 0.1, "softmax", 1.0, "linear", True),
    ("loss0.1_softmax_wide_mlp_z", "loss", 0.1, "softmax", 1.0, "wide_mlp", True),
    ("loss0.1_softmax_linear", "loss", 0.1, "softmax", 1.0, "linear", False),  # final (z off)
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = mor.get_config(arg)
  c.train.steps = STEPS[arg or "tiny"]
  c.train.schedule, c.train.min_lr_ratio = "cosine", 0.1
  return c


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in STEPS:
    raise ValueError(f"mor_routers has no sweep for preset {preset!r}; "
                     f"choose one of {', '.join(STEPS)}")
  cells = []
  for name, sampling, coeff, func, alpha, arch, warm, z in EXPERT:
    cells.append(sweep.Cell(
        name=f"expert_{name}",
        label=f"Expert | {sampling}{f' {coeff:g}' if coeff else ''} | {func} | alpha={alpha:g} | "
              f"{arch} | "
              f"warm-up={'y' if warm else 'n'} | z={'y' if z else 'n'}",
        overrides={"model.mor.kind": "expert", "model.mor.router": arch,
                   "model.mor.expert.sampling": sampling, "model.mor.expert.aux_coeff": coeff,
                   "model.mor.expert.func": func, "model.mor.expert.alpha": alpha,
                   "model.mor.expert.cap_warmup_steps": STEPS[preset] // 5 if warm else 0,
                   "model.mor.z_coeff": 1e-3 if z else 0.0},
        reference=f"expert_{FINAL_EXPERT}"))
  for name, balancing, coeff, func, alpha, arch, z in TOKEN:
    rate = "model.mor.token.bias_rate" if balancing == "loss_free" else "model.mor.token.bal_coeff"
    cells.append(sweep.Cell(
        name=f"token_{name}",
        label=f"Token | {balancing} {coeff:g} | {func} | alpha={alpha:g} | {arch} | "
              f"z={'y' if z else 'n'}",
        overrides={"model.mor.kind": "token", "model.mor.router": arch,
                   "model.mor.token.balancing": balancing, rate: coeff,
                   "model.mor.token.func": func, "model.mor.token.alpha": alpha,
                   "model.mor.z_coeff": 1e-5 if z else 0.0},
        reference=f"token_{FINAL_TOKEN}"))
  return cells
