"""MoR paper Table 15 (MoR rows): recursion-wise KV caching against recursive KV sharing.

  python launch.py --config=configs/ablations/mor_kv.py:tiny --workdir=runs/mor_kv --sweep
  python launch.py --config=configs/ablations/mor_kv.py:tiny --workdir=runs/mor_kv --report

MoR Nr = 3, middle-cycle, a fixed token budget (10B tokens at 135m/360m; docs/methods/mor.md
§3, §5.5) with cosine decay to 10%. Expert choice: Cache / Share / hybrid Share (the selected
tokens refresh their own K/V); token choice: Cache / Share. The Recursive and Vanilla KV-sharing
rows of Table 15 (sharing across layers without routing) are not a MoR mode and are not included.
"""

import ml_collections as mlc

from configs.ablations import mor_routers
from research import sweep

CELLS = (  # name, router, KV mode, Table 15 label
    ("expert_cache", "expert", "cache", "Expert + Cache"),
    ("expert_share", "expert", "share", "Expert + Share"),
    ("expert_share_update", "expert", "share_update", "Expert + hybrid Share"),
    ("token_cache", "token", "cache", "Token + Cache"),
    ("token_share", "token", "share", "Token + Share"),
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return mor_routers.get_config(arg)


def get_sweep(arg: str | None = None) -> list[sweep.Cell]:
  preset = arg or "tiny"
  if preset not in mor_routers.STEPS:
    raise ValueError(f"mor_kv has no sweep for preset {preset!r}; "
                     f"choose one of {', '.join(mor_routers.STEPS)}")
  return [sweep.Cell(name=name, label=f"MoR Nr=3 | {label}",
                     overrides={"model.mor.kind": kind, "model.mor.kv": kv,
                                "model.mor.z_coeff": 1e-5 if kind == "token" else 0.0})
          for name, kind, kv, label in CELLS]
