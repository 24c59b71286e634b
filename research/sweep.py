"""Ablation sweeps: a config file's `get_sweep(arg)` names the cells of a paper table.

  python launch.py --config=configs/ablations/vanilla_depth.py:tiny --workdir=runs/depth --sweep
  python launch.py --config=configs/ablations/vanilla_depth.py:tiny --workdir=runs/depth --report

Every cell trains in `<workdir>/<cell>/` like a plain run, so an interrupted cell resumes from
its checkpoints; a finished one holds `done.json` (its final metrics) and is skipped. A cell's
config is the config file's, then the cell's overrides, then the command line's `--config.*`
overrides (the command line has the last word, e.g. to shrink every cell for a smoke test).
`--sweep_index=N` runs one cell (cluster job arrays, `--sweep_emit=slurm|shell` writes the
scripts), `--sweep_list` prints the cells and `--report` writes results.{md,csv,png}.
"""

import copy
import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
from collections.abc import Collection, Sequence
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from research import config as config_lib
from research.model.lm import LanguageModel
from research.train import flops, loop
from research.train import mesh as mesh_lib

DONE = "done.json"  # written into a cell's workdir when its run has finished
RESULT_COLUMNS = ("cell", "label", "group", "seed", "status", "non_embedding_params", "params",
                  "flops_per_token", "steps", "planned_steps", "tokens", "train_flops", "valid_nll",
                  "tokens_per_s")


# Routing statistics the report tables when runs log them (research/model/mor.py, moe.py): MoR
# expert choice's sampling accuracy per recursion step (Table 13 "Samp-Acc"), token choice's MaxVio
# and mean-probability entropy (Table 14), the fraction of tokens per final depth, MoE's.
ROUTER_STATS = ("mor/threshold_acc", "mor/maxvio", "mor/entropy", "mor/depth_frac",
                "moe/max_violation", "moe/dropped")
ROUTER_TAIL = 0.1  # the statistics are averaged over the last 10 % of a run's train records


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a sweep: `name` is its directory, `label` its row in the paper's table."""

  name: str
  label: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> value
  group: str = ""  # with --sweep_seeds: the table row this run is one seed of (the cell's name)
  reference: str = ""  # the cell its "Paired by seed" row is read against ('': the first cell)


def with_seeds(cells: Sequence[Cell], seeds: Sequence[int]) -> list[Cell]:
  """Every cell once per seed, seed-major (a whole table of the first seed comes first): run
  `<name>_seed<k>` sets config.seed = k (the model init, and the data order unless data.seed is
  set) and is grouped under `<name>` by --report. No seeds: the cells as they are."""
  if not seeds:
    return list(cells)
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise config_lib.ConfigError(f"--sweep_seeds={','.join(map(str, seeds))}: seeds must be "
                                 "distinct non-negative integers")
  for c in cells:
    if "seed" in c.overrides:
      raise config_lib.ConfigError(f"--sweep_seeds: cell {c.name!r} sets config.seed itself")
  return [Cell(f"{c.name}_seed{s}", c.label, dict(c.overrides, seed=s), group=c.name,
               reference=c.reference) for s in seeds for c in cells]


def parse_spec(config_spec: str) -> tuple[str, str | None]:
  """'configs/x.py:tiny' -> ('configs/x.py', 'tiny'); no colon -> (path, None)."""
  path, _, arg = config_spec.partition(":")
  return path, arg or None


def sweep_name(config_spec: str) -> str:
  """'configs/ablations/vanilla_depth.py:tiny' -> 'vanilla_depth_tiny' (the W&B group)."""
  path, arg = parse_spec(config_spec)
  stem = os.path.splitext(os.path.basename(path))[0]
  return f"{stem}_{arg}" if arg else stem


def load_sweep(config_path: str, arg: str | None) -> list[Cell]:
  """Imports the config file (as ml_collections does) and returns its get_sweep(arg) cells."""
  spec = importlib.util.spec_from_file_location("sweep_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(f"{config_path} defines no get_sweep(arg): it is not a sweep")
  cells = list(module.get_sweep(arg))
  if not cells:
    raise config_lib.ConfigError(f"{config_path}: get_sweep({arg!r}) returned no cells")
  seen = set()
  for c in cells:
    if not re.fullmatch(r"[A-Za-z0-9_.=-]+", c.name):
      raise config_lib.ConfigError(f"{config_path}: cell name {c.name!r} must be a plain "
                                   "directory name (letters, digits, _ . = -)")
    if c.name in seen:
      raise config_lib.ConfigError(f"{config_path}: two cells are named {c.name!r}")
    seen.add(c.name)
  for c in cells:
    if c.reference and c.reference not in seen:
      raise config_lib.ConfigError(f"{config_path}: cell {c.name!r} names reference "
                                   f"{c.reference!r}, which is no cell of the sweep")
  return cells


def config_args(argv: Sequence[str]) -> list[str]:
  """The command line's `--config.key=value` arguments, verbatim (`--config.key value` joined)."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith(("--config.", "--noconfig.")):
      nxt = argv[i + 1] if i + 1 < len(argv) else None
      if "=" not in a and nxt is not None and not nxt.startswith("-"):
        a = f"{a}={nxt}"
      out.append(a)
  return out


def cell_config(cfg: mlc.ConfigDict, cell: Cell, *, sweep: str = "",
                keep: Collection[str] = ()) -> mlc.ConfigDict:
  """A copy of `cfg` with the cell's overrides, except the keys in `keep` (set on the command
  line); in a sweep, W&B runs share the group `sweep` and are tagged with the cell name."""
  cfg = copy.deepcopy(cfg)
  for key, value in cell.overrides.items():
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else ():
      node = node.get(part) if isinstance(node, mlc.ConfigDict) else None
    if not isinstance(node, mlc.ConfigDict) or leaf not in node:
      raise config_lib.ConfigError(f"sweep cell {cell.name!r}: unknown config key {key!r}")
    if isinstance(node[leaf], mlc.ConfigDict):
      raise config_lib.ConfigError(f"sweep cell {cell.name!r}: {key!r} is a config section; "
                                   "override its fields one by one")
    if key in keep:
      continue
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f"sweep cell {cell.name!r}: config.{key}={value!r}: {e}") from e
  if sweep:
    cfg.wandb.group = cfg.wandb.group or sweep
    cfg.wandb.tags = ",".join(t for t in (cfg.wandb.tags, cell.name) if t)
  return cfg


def isoflop_warmup(cfg: mlc.ConfigDict, budget: float, fraction: float = 0.05) -> int:
  """Warm-up steps of the paper's isoFLOP runs: `fraction` of the steps `budget` would give this
  model (its smallest budget), then the same count at every budget (docs/methods/mor.md §4.2)."""
  cfg = copy.deepcopy(cfg)
  cfg.train.flop_budget = budget
  return int(fraction * loop.total_steps(cfg))


def cell_configs(cfg: mlc.ConfigDict, cells: Sequence[Cell], workdir: str, sweep: str,
                 keep: Collection[str]) -> list[mlc.ConfigDict]:
  """Every cell's config, validated before anything runs; errors name the cell. The cells share
  one data cache (corpus manifest, tokenizer): <workdir>/cache unless data.cache_dir is set."""
  cfgs = []
  for cell in cells:
    c = cell_config(cfg, cell, sweep=sweep, keep=keep)
    c.data.cache_dir = c.data.cache_dir or os.path.join(workdir, "cache")
    try:
      config_lib.validate(c)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"sweep cell {cell.name!r}: {e}") from e
    warmup, steps = c.train.warmup_steps, loop.total_steps(c)
    if warmup >= steps:
      raise config_lib.ConfigError(
          f"sweep cell {cell.name!r}: config.train.warmup_steps={warmup} is not below the run's "
          f"{steps} steps (a smaller budget on the command line needs a smaller warm-up too)")
    cfgs.append(c)
  return cfgs


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def cell_status(workdir: str) -> str:
  """done | failed (finished without a result, e.g. diverged) | interrupted (has checkpoints,
  no done.json; also a cell that is running now) | pending."""
  done = _read_json(os.path.join(workdir, DONE))
  if done is not None:
    return "done" if done.get("status") == "ok" else "failed"
  ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
    return "interrupted"
  return "pending"


def run_cells(cells: Sequence[Cell], cfgs: Sequence[mlc.ConfigDict], workdir: str) -> str:
  """Trains the cells one after another, skipping finished ones and resuming interrupted ones.

  Returns "stopped" when a signal stopped a cell (it is checkpointed; the same command resumes
  it), "failed" when a cell ended without a result (e.g. non-finite; the others still ran),
  else "ok".
  """
  outcome = "ok"
  for cell, cfg in zip(cells, cfgs, strict=True):
    cell_dir = os.path.join(workdir, cell.name)
    status = cell_status(cell_dir)
    if status in ("done", "failed"):
      print(f"cell {cell.name}: {status}, skipped ({os.path.join(cell_dir, DONE)})", flush=True)
      continue
    verb = "resuming" if status == "interrupted" else "starting"
    print(f"cell {cell.name} ({cell.label}): {verb} in {cell_dir}", flush=True)
    result = loop.train(cfg, cell_dir)
    if result["status"].startswith("stopped"):
      print(f"sweep stopped in cell {cell.name}; run the same command again to resume",
            flush=True)
      return "stopped"
    if result["status"] != "ok":
      outcome = "failed"
    if jax.process_index() == 0:
      path = os.path.join(cell_dir, DONE)
      with open(f"{path}.tmp", "w") as f:
        json.dump(dict(result, cell=cell.name, label=cell.label), f, indent=1)
      os.replace(f"{path}.tmp", path)
  return outcome


# --- cluster scripts --------------------------------------------------------------------------


def _command(config_spec: str, workdir: str, index: str, extra: Sequence[str]) -> str:
  args = [f"--config={config_spec}", f"--workdir={workdir}", *extra]  # extra: --sweep_seeds too
  return " ".join(["python launch.py", *map(shlex.quote, args), f"--sweep_index={index}"])


def _cell_lines(cells: Sequence[Cell]) -> str:
  return "\n".join(f"#   {i:>3}  {c.name}: {c.label}" for i, c in enumerate(cells))


def emit_slurm(config_spec: str, workdir: str, cells: Sequence[Cell], extra: Sequence[str],
               repo: str) -> str:
  """A SLURM array script: array task i trains cell i (edit the resources to your cluster)."""
  name = sweep_name(config_spec)
  log = os.path.join(os.path.abspath(workdir), "slurm-%A_%a.out")
  cmd = _command(config_spec, workdir, '"$SLURM_ARRAY_TASK_ID"', extra)
  return f"""#!/bin/bash
# Sweep {name}: one cell per SLURM array task ({len(cells)} cells).
#   sbatch {os.path.join(workdir, "sweep.slurm")}          # every cell
#   sbatch --array=3 {os.path.join(workdir, "sweep.slurm")}  # one cell
# Re-submitting skips finished cells and resumes interrupted ones from their checkpoints.
# Cells:
{_cell_lines(cells)}
#
# Resources are placeholders. One process per GPU (JAX's SLURM default): --ntasks-per-node =
# GPUs per node, every task sees all of the node's GPUs (--gpus-per-node, not --gpus-per-task)
# and drives GPU $SLURM_LOCALID. With more than one task, launch.py starts jax.distributed from
# the SLURM environment by itself. One process per node instead: --ntasks-per-node=1 and
# export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 (docs/cluster.md).
#SBATCH --job-name={name}
#SBATCH --array=0-{len(cells) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output={log}
##SBATCH --partition=gpu
##SBATCH --account=my-account

set -euo pipefail
cd {shlex.quote(repo)}
srun {cmd}
"""


def emit_shell(config_spec: str, workdir: str, cells: Sequence[Cell], extra: Sequence[str],
               repo: str) -> str:
  """A bash script that runs the given cell indices (default: all) one after another."""
  cmd = _command(config_spec, workdir, '"$i"', extra)
  every = " ".join(str(i) for i in range(len(cells)))
  return f"""#!/bin/bash
# Sweep {sweep_name(config_spec)}: runs cells one after another, each in its own process.
#   bash {os.path.join(workdir, "sweep.sh")}        # every cell
#   bash {os.path.join(workdir, "sweep.sh")} 0 2    # cells 0 and 2
# On a TPU pod run it on every host at once, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="bash {workdir}/sweep.sh"
# Finished cells are skipped, interrupted ones resume from their checkpoints.
# Cells:
{_cell_lines(cells)}
set -euo pipefail
cd {shlex.quote(repo)}
cells=("$@")
if [ ${{#cells[@]}} -eq 0 ]; then cells=({every}); fi
for i in "${{cells[@]}}"; do
  {cmd}
done
"""


# --- results ----------------------------------------------------------------------------------


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _vocab_size(cfg: mlc.ConfigDict, workdir: str) -> int:
  """The run's padded vocabulary: from its saved config, else from the config (no data read)."""
  saved = _read_json(os.path.join(workdir, "config.json"))
  if saved is not None:
    return saved["model"]["vocab_size"]
  if cfg.model.vocab_size > 0:
    return cfg.model.vocab_size
  if cfg.data.tokenizer == "bpe":
    return cfg.data.bpe_vocab_size
  from tokenizers import Tokenizer

  path = cfg.data.tokenizer
  path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  return Tokenizer.from_file(path).get_vocab_size()


def param_counts(model_cfg: mlc.ConfigDict) -> tuple[int, int]:
  """(non-embedding, all) unique parameters, from the abstract model (nothing allocated)."""
  axes = mesh_lib.MESH_AXES
  mesh = jax.make_mesh((1,) * len(axes), axes, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))

  def count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

  embedding = count(model.embed) + (count(model.head) if model.head is not None else 0)
  total = count(model)
  return total - embedding, total


def router_stats(train: Sequence[dict], tail: float = ROUTER_TAIL) -> dict[str, list[float]]:
  """Each ROUTER_STATS key the run logged: its mean over the last `tail` of the train records
  (at least one), elementwise for vectors (per step, layer or depth). Training batches, not
  the paper's validation samples."""
  last = list(train[-max(1, math.ceil(tail * len(train))):])
  out = {}
  for key in ROUTER_STATS:
    values = [np.ravel(np.asarray(r[key], np.float64)) for r in last if key in r]
    if values:
      out[key] = [float(v) for v in np.mean(values, axis=0)]
  return out


def collect(cells: Sequence[Cell], cfgs: Sequence[mlc.ConfigDict], workdir: str) -> list[dict]:
  """One row per cell: status, sizes, FLOPs (paper convention), tokens, NLL, throughput.

  Final metrics come from done.json; an unfinished cell shows its latest validation record.
  """
  rows = []
  for cell, cfg in zip(cells, cfgs, strict=True):
    cell_dir = os.path.join(workdir, cell.name)
    cfg = config_lib.with_derived(cfg, _vocab_size(cfg, cell_dir))
    records = _records(cell_dir)
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    done = _read_json(os.path.join(cell_dir, DONE))
    steps = done["step"] if done else max((r["step"] for r in train), default=0)
    nll = done.get("nll") if done else (valid[-1]["nll"] if valid else None)
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    non_emb, total = param_counts(cfg.model)
    per_token = flops.paper_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens = steps * cfg.train.batch_size * cfg.data.seq_len
    rows.append(dict(
        cell=cell.name, label=cell.label, group=cell.group or cell.name, reference=cell.reference,
        seed=cell.overrides.get("seed", cfg.seed), status=cell_status(cell_dir),
        non_embedding_params=non_emb, params=total, flops_per_token=per_token, steps=steps,
        planned_steps=loop.total_steps(cfg), tokens=tokens, train_flops=per_token * tokens,
        valid_nll=nll, tokens_per_s=statistics.median(speeds) if speeds else None,
        router=router_stats(train),
        curve=[(r["step"] * cfg.train.batch_size * cfg.data.seq_len * per_token, r["nll"])
               for r in valid]))
  return rows


def _si(x: float | None) -> str:
  """315.0M, 19.8B, 1.6K; '-' for None."""
  if x is None:
    return "-"
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:g}"


def _flops(x: float) -> str:
  """1.65e19 (the paper writes 16.5e18), 4.61e7."""
  if not x:
    return "0"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{float(mantissa):g}e{int(exponent)}"


def _md(text: str) -> str:
  """Text for one markdown table cell: a `|` (labels join their columns with ' | ') escaped."""
  return str(text).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], title: str) -> str:
  """results.md: one row per cell; Steps is trained / planned (loop.total_steps)."""
  header = ("| Cell | Model | Status | N-emb params | Params | FLOPs/token | Steps | N_tok "
            "| FLOPs | Valid NLL | tokens/s |")
  lines = [f"# {title}", "",
           "FLOPs follow the paper's convention (forward only, docs/methods/mor.md §4.3); "
           "N_tok and FLOPs count the steps trained so far. Status: done | failed | "
           "interrupted (NLL of its latest evaluation) | pending.", "",
           header, "|" + "---|" * header.count(" | ") + "---|"]
  for r in rows:
    nll = "-" if r["valid_nll"] is None else f"{r['valid_nll']:.4f}"
    speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    lines.append(
        f"| {_md(r['cell'])} | {_md(r['label'])} | {r['status']} "
        f"| {_si(r['non_embedding_params'])} | {_si(r['params'])} | {_si(r['flops_per_token'])} "
        f"| {r['steps']}/{r['planned_steps']} "
        f"| {_si(r['tokens'])} | {_flops(r['train_flops'])} | {nll} "
        f"| {speed} |")
  return "\n".join(lines) + "\n"


def seed_rows(rows: Sequence[dict]) -> list[dict]:
  """One row per group of seeds (with --sweep_seeds): the seeds' validation NLLs, their mean and
  spread (max - min), over the runs that have an NLL; status done only when every seed is."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r)
  out = []
  for name, runs in groups.items():
    nlls = [r["valid_nll"] for r in runs if r["valid_nll"] is not None]
    out.append(dict(
        cell=name, label=runs[0]["label"], seeds=[r["seed"] for r in runs],
        valid_nlls=[r["valid_nll"] for r in runs],
        mean_nll=statistics.fmean(nlls) if nlls else None,
        spread=max(nlls) - min(nlls) if len(nlls) > 1 else None,
        status="done" if all(r["status"] == "done" for r in runs) else "partial"))
  return out


def seed_table(rows: Sequence[dict]) -> str:
  """The per-cell table over seeds: mean validation NLL, each seed's, and their spread."""
  header = "| Cell | Model | Status | Valid NLL (mean) | per seed | spread |"
  lines = ["## Over seeds", "",
           "Mean and each seed's final validation NLL; spread = max - min over the seeds. A "
           "difference between two cells smaller than their spreads is not resolved.", "",
           header, "|" + "---|" * header.count(" | ") + "---|"]
  for g in seed_rows(rows):
    per_seed = ", ".join(f"s{s}: " + ("-" if v is None else f"{v:.4f}")
                         for s, v in zip(g["seeds"], g["valid_nlls"], strict=True))
    mean = "-" if g["mean_nll"] is None else f"{g['mean_nll']:.4f}"
    spread = "-" if g["spread"] is None else f"{g['spread']:.4f}"
    lines.append(f"| {_md(g['cell'])} | {_md(g['label'])} | {g['status']} | {mean} "
                 f"| {per_seed} | {spread} |")
  return "\n".join(lines) + "\n"


def paired_rows(rows: Sequence[dict]) -> list[dict]:
  """Each group against its reference cell (a row's `reference`; by default the first group),
  seed by seed: NLL(cell, seed k) - NLL(reference, seed k) for the seeds both have. Seed k gives
  every cell the same data order, so these differences cancel it. `se` is the standard error of
  their mean (sample standard deviation / sqrt(n), two or more seeds); `sign` is "lower" or
  "higher" when every paired seed agrees, "mixed" when they do not. A reference is not paired
  with itself."""
  groups = {g["cell"]: g for g in seed_rows(rows)}
  names = list(groups)
  if not names:
    return []
  refs = {r["group"]: r.get("reference") or names[0] for r in rows}
  missing = sorted({v for v in refs.values() if v not in groups})
  if missing:
    raise ValueError(f"sweep cells name references that are not cells: {missing}")
  out = []
  for name in names:
    if refs[name] == name:
      continue
    g, r = groups[name], groups[refs[name]]
    ref = dict(zip(r["seeds"], r["valid_nlls"], strict=True))
    diffs = {s: v - ref[s] for s, v in zip(g["seeds"], g["valid_nlls"], strict=True)
             if v is not None and ref.get(s) is not None}
    signs = {(d > 0) - (d < 0) for d in diffs.values()}  # a tie agrees with neither side
    out.append(dict(cell=name, label=g["label"], reference=refs[name], diffs=diffs,
                    mean_diff=statistics.fmean(diffs.values()) if diffs else None,
                    se=statistics.stdev(diffs.values()) / math.sqrt(len(diffs))
                    if len(diffs) > 1 else None,
                    sign=("lower" if signs == {-1} else "higher" if signs == {1} else "mixed")
                    if len(diffs) > 1 else "-"))
  return out


def paired_table(rows: Sequence[dict]) -> str:
  """paired_rows as markdown: each cell minus the reference cell, per seed, and their mean."""
  pairs = paired_rows(rows)
  refs = list(dict.fromkeys(p["reference"] for p in pairs)) or ["-"]
  one = len(refs) == 1
  ref = _md(refs[0]) if one else "its reference"
  header = ("| Cell | Model | " + ("" if one else "reference | ")
            + f"minus {'reference' if not one else ref} (mean) | s.e. | per seed | every seed |")
  whose = f"{ref}'s" if one else "its reference cell's"
  lines = [f"## Paired by seed, against {ref}", "",
           f"Each cell's validation NLL minus {whose} of the same seed (the same data order), "
           "their mean and its standard error (s.e.). "
           "'every seed': lower or higher when all paired seeds agree, else mixed. With n seeds, "
           "|mean| / s.e. above Student's t for n - 1 degrees of freedom (4.30 for 3 seeds, 12.7 "
           "for 2) is a difference at the 95 % level.", "",
           header, "|" + "---|" * header.count(" | ") + "---|"]
  for p in pairs:
    per_seed = ", ".join(f"s{s}: {d:+.4f}" for s, d in sorted(p["diffs"].items())) or "-"
    mean = "-" if p["mean_diff"] is None else f"{p['mean_diff']:+.4f}"
    se = "-" if p["se"] is None else f"{p['se']:.4f}"
    against = "" if one else f"{_md(p['reference'])} | "
    lines.append(f"| {_md(p['cell'])} | {_md(p['label'])} | {against}{mean} | {se} | "
                 f"{per_seed} | {p['sign']} |")
  return "\n".join(lines) + "\n"


def _vector(values: Sequence[float]) -> str:
  return " / ".join(f"{v:.3f}" for v in values)


def router_table(rows: Sequence[dict]) -> str:
  """The routing statistics per cell (mean over its seeds, each averaged over the last
  ROUTER_TAIL of its train records); '' when no run logged any."""
  keys = [k for k in ROUTER_STATS if any(k in r.get("router", {}) for r in rows)]
  if not keys:
    return ""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r)
  header = "| Cell | Model | seeds | " + " | ".join(keys) + " |"
  lines = ["## Router statistics", "",
           f"Training batches, mean of each run's last {ROUTER_TAIL:.0%} of train records, then "
           "over its seeds; vectors are per recursion step (threshold_acc), per final "
           "depth 0..Nr (depth_frac) or per layer (moe/). Not the paper's validation samples.", "",
           header, "|" + "---|" * header.count(" | ") + "---|"]
  for name, runs in groups.items():
    cells = []
    for key in keys:
      values = [r["router"][key] for r in runs if key in r.get("router", {})]
      cells.append(_vector(np.mean(values, axis=0)) if values else "-")
    seeds = sum(bool(r.get("router")) for r in runs)
    lines.append(f"| {_md(name)} | {_md(runs[0]['label'])} | {seeds} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], title: str, path: str) -> None:
  """Validation NLL against training FLOPs: one curve per run, its last point marked (hollow
  when the run has not finished); the seeds of one cell share a colour and one legend entry,
  each seed its own line style; the legend sits outside the axes."""
  from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global state

  fig = Figure(figsize=(10, 4.5), layout="constrained")
  ax = fig.subplots()
  colors: dict[str, str] = {}
  seen: dict[str, int] = {}
  seeded = any(r["group"] != r["cell"] for r in rows)
  for r in rows:
    points = [(f, nll) for f, nll in r["curve"] if f > 0]
    if not points:
      continue
    xs, ys = zip(*points, strict=True)
    group, k = r["group"], seen.get(r["group"], 0)
    seen[group] = k + 1
    style = ("-", "--", ":", "-.")[k % 4]
    label = None if k else r["label"] if seeded else f"{r['label']} ({r['status']})"
    line, = ax.plot(xs, ys, marker=".", linestyle=style, alpha=0.7, color=colors.get(group),
                    label=label)
    colors[group] = line.get_color()
    ax.plot(xs[-1:], ys[-1:], "o", markersize=8, color=line.get_color(),
            fillstyle="full" if r["status"] == "done" else "none")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (paper convention, forward only)")
  ax.set_ylabel("validation NLL")
  ax.set_title(title + (" (line style: seed; hollow: not finished)" if seeded else ""))
  ax.grid(True, which="both", alpha=0.3)
  if ax.lines:
    fig.legend(fontsize="small", loc="outside right upper")
  fig.savefig(path, dpi=120)


def report(cells: Sequence[Cell], cfgs: Sequence[mlc.ConfigDict], workdir: str,
           title: str) -> list[dict]:
  """Writes results.md, results.csv and results.png into `workdir`; returns the rows. Raises
  ConfigError, writing nothing, when no cell has results there (an empty or mistyped workdir)."""
  check_has_results(cells, workdir)
  rows = collect(cells, cfgs, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  seeded = any(r["group"] != r["cell"] for r in rows)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown_table(rows, title) + "\n")
    if seeded:
      f.write(seed_table(rows) + "\n")
      f.write(paired_table(rows) + "\n")
    routers = router_table(rows)
    if routers:
      f.write(routers + "\n")
    f.write("![validation NLL against FLOPs](results.png)\n")
  plot(rows, title, os.path.join(workdir, "results.png"))
  return rows


def has_results(cell_dir: str) -> bool:
  """The cell finished (done.json) or logged at least one metrics record."""
  return os.path.exists(os.path.join(cell_dir, DONE)) or bool(_records(cell_dir))


def check_has_results(cells: Sequence[Cell], workdir: str) -> None:
  """Raises ConfigError naming the workdir when it is missing or none of its cells has results."""
  if not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir}: no such directory, so no cell has "
                                 "results to report (run the sweep there first)")
  if not any(has_results(os.path.join(workdir, c.name)) for c in cells):
    names = ", ".join(c.name for c in cells[:3]) + (", ..." if len(cells) > 3 else "")
    raise config_lib.ConfigError(
        f"--workdir={workdir}: no cell has results (none of the {len(cells)} cell directories "
        f"{names} holds metrics.jsonl or {DONE}); run the sweep there first")


# --- launcher entry ---------------------------------------------------------------------------


def main(config_spec: str, cfg: mlc.ConfigDict, workdir: str, *, argv: Sequence[str],
         index: int | None = None, list_cells: bool = False, emit: str | None = None,
         results: bool = False, seeds: Sequence[int] = ()) -> bool:
  """What `launch.py --sweep[_index|_list|_emit] / --report` does with the parsed config; False
  when a cell it ran ended without a result (the launcher then exits with status 1). `seeds`
  (--sweep_seeds) runs every cell once per seed (with_seeds); index and the lists count runs."""
  path, arg = parse_spec(config_spec)
  name, extra = sweep_name(config_spec), config_args(argv)
  keep = {re.sub(r"^--(no)?config\.", "", a.split("=", 1)[0]) for a in extra}
  if seeds and "seed" in keep:
    raise config_lib.ConfigError("--sweep_seeds and --config.seed both set the seed; drop one")
  cells = with_seeds(load_sweep(path, arg), seeds)
  if seeds:
    extra = [*extra, f"--sweep_seeds={','.join(map(str, seeds))}"]
  if list_cells:
    for i, cell in enumerate(cells):
      print(f"{i:>3}  {cell.name:<24} {cell_status(os.path.join(workdir, cell.name)):<12} "
            f"{cell.label}")
    return True
  if emit:
    if emit not in ("slurm", "shell"):
      raise config_lib.ConfigError(f"--sweep_emit={emit!r}: must be slurm or shell")
    make = emit_slurm if emit == "slurm" else emit_shell
    text = make(config_spec, workdir, cells, extra, os.getcwd())
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, "sweep.slurm" if emit == "slurm" else "sweep.sh")
    with open(out, "w") as f:
      f.write(text)
    os.chmod(out, 0o755)
    print(f"wrote {out} ({len(cells)} cells)")
    return True
  cfgs = cell_configs(cfg, cells, workdir, name, keep)
  if results:
    print(markdown_table(report(cells, cfgs, workdir, name), name))
    print(f"wrote {workdir}/results.md, results.csv, results.png")
    return True
  if cfg.mode != "train":
    raise config_lib.ConfigError(f"config.mode={cfg.mode!r}: a sweep trains; use --report to "
                                 "collect its results")
  if index is not None:
    if not 0 <= index < len(cells):
      raise config_lib.ConfigError(
          f"--sweep_index={index}: the sweep has cells 0..{len(cells) - 1}")
    cells, cfgs = cells[index:index + 1], cfgs[index:index + 1]
  outcome = run_cells(cells, cfgs, workdir)
  if outcome != "stopped" and index is None:
    print(f"sweep {name}: no cell left to run; collect the results with --report", flush=True)
  return outcome != "failed"
