"""The RMoE paper's router statistics (Table 1's Inner / Outer Balance, gate entropy, cross-layer
mutual information) for every cell of an MoE-family sweep, read from each run's newest checkpoint
on its first validation batches:

  python -m research.analysis.moe_router_table --config=configs/ablations/moe_rmoe.py:tiny \
      --workdir=runs/moe_rmoe --sweep_seeds=0,1 [--batches=4]

It prints a markdown table (mean over the cell's seeds, then each seed) and writes it to
<workdir>/router_statistics.md. `--report` cannot give these: they need the router's full
distribution per token, which the training logs do not keep. The statistics themselves are
research/analysis/moe_routing.py's; this file only loops over cells and batches.
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from research import config as config_lib
from research import sweep
from research.analysis import moe_routing, routing
from research.train import loop

STATS = ("inner_balance", "outer_balance", "gate_entropy", "cross_layer_mi")
HEADINGS = ("Inner Balance (top1 / top2)", "Outer Balance (sum top-k)", "gate entropy (nats)",
            "cross-layer MI (nats)")
OUTPUT = "router_statistics.md"


def concatenate(batches: Sequence[list[moe_routing.Application]]) -> list[moe_routing.Application]:
  """The applications of several captured batches as one capture over their rows (axis 0):
  every call must be the same layer in the same place in each batch."""
  first = batches[0]
  out = []
  for call, a in enumerate(first):
    parts = [b[call] for b in batches]
    if any((p.layer, p.member, p.group) != (a.layer, a.member, a.group) for p in parts):
      raise ValueError(f"concatenate: call {call} is a different layer in different batches")

    def cat(field: str, parts=parts):
      return [np.concatenate(arrays) for arrays in zip(*(getattr(p, field) for p in parts),
                                                       strict=True)]

    out.append(dataclasses.replace(a, logits=cat("logits"), weights=cat("weights"),
                                   experts=cat("experts"), keep=cat("keep"),
                                   valid=np.concatenate([p.valid for p in parts])))
  return out


def run_statistics(workdir: str, batches: int = 4) -> tuple[dict[str, float], int]:
  """(router_statistics over the first `batches` validation batches of the run's newest
  checkpoint, taken as one sample; the checkpoint's step)."""
  loaded = routing.load_run(workdir)
  if loaded.run.cfg.model.moe.num_experts <= 0:
    raise config_lib.ConfigError(f"{workdir} is not an MoE-family run "
                                 "(model.moe.num_experts = 0)")
  it = loop.make_iterator(loaded.run, loaded.run.valid_docs, train=False)
  captured = [moe_routing.capture(loaded.model, next(it)) for _ in range(batches)]
  return moe_routing.router_statistics(concatenate(captured)), loaded.step


def markdown(rows: Sequence[dict], title: str) -> str:
  """One line per cell group: the mean over its seeds, then each seed's value; `rows` are
  {"group", "label", "seed", "step", **STATS} as `collect` returns them."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r)
  lines = [f"## {title}", "",
           "Each run's newest checkpoint on its first validation batches, taken as one sample; "
           "mean over seeds (each seed in brackets). Inner Balance: mean p_top1 / p_top2 "
           "(1: the top two equal). Outer Balance: mean sum of the top-k probabilities. MI: "
           "plug-in estimate between consecutive MoE calls, mean over the pairs.", "",
           "| Cell | Model | seeds | step | " + " | ".join(HEADINGS) + " |",
           "|---|---|---|---|" + "---|" * len(STATS)]
  for name, runs in groups.items():
    cells = []
    for key in STATS:
      values = [r[key] for r in runs]
      each = ", ".join(f"{v:.3f}" for v in values)
      cells.append(f"{np.mean(values):.3f} ({each})" if len(values) > 1 else f"{values[0]:.3f}")
    steps = "/".join(str(s) for s in sorted({r["step"] for r in runs}))
    lines.append(f"| {name} | {runs[0]['label']} | {len(runs)} | {steps} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def collect(cells: Sequence[sweep.Cell], workdir: str, batches: int) -> list[dict]:
  """run_statistics of every cell that has a checkpoint under `workdir` (the others skipped,
  named on stderr); ConfigError when none has."""
  rows = []
  for cell in cells:
    cell_dir = os.path.join(workdir, cell.name)
    ckpt = os.path.join(cell_dir, "checkpoints")
    if not (os.path.isdir(ckpt) and os.listdir(ckpt)):
      print(f"skipping {cell.name}: no checkpoint in {ckpt}", file=sys.stderr)
      continue
    stats, step = run_statistics(cell_dir, batches)
    rows.append(dict(group=cell.group or cell.name, label=cell.label,
                     seed=cell.overrides.get("seed"), step=step, **stats))
  if not rows:
    raise config_lib.ConfigError(f"--workdir={workdir}: no cell of the sweep has a checkpoint "
                                 "(run the sweep there first)")
  return rows


_CONFIG = flags.DEFINE_string("config", None, "The sweep's config spec, e.g. "
                              "configs/ablations/moe_rmoe.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir.")
_SEEDS = flags.DEFINE_list("sweep_seeds", [], "The --sweep_seeds the sweep ran with.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Validation batches per run.")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's per-restore INFO lines
  try:
    if not _CONFIG.value or not _WORKDIR.value:
      raise config_lib.ConfigError("--config and --workdir are required")
    if _BATCHES.value < 1:
      raise config_lib.ConfigError(f"--batches={_BATCHES.value}: must be at least 1")
    path, arg = sweep.parse_spec(_CONFIG.value)
    if not os.path.exists(path):
      raise config_lib.ConfigError(f"--config={_CONFIG.value}: no such file {path}")
    try:
      seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
      raise config_lib.ConfigError(f"--sweep_seeds={','.join(_SEEDS.value)}: not a list of "
                                   "integers") from None
    cells = sweep.with_seeds(sweep.load_sweep(path, arg), seeds)
    rows = collect(cells, _WORKDIR.value, _BATCHES.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  text = markdown(rows, f"Router statistics: {sweep.sweep_name(_CONFIG.value)}")
  with open(os.path.join(_WORKDIR.value, OUTPUT), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
