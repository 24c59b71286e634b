"""Metric sinks: metrics.jsonl in the workdir (always), Weights & Biases (best effort), stdout.

W&B never stops training (and in offline mode prints nothing; its files are still written): an
online init that fails (no network, no API key) is retried offline
(`wandb sync` uploads it later); a failing init or log is reported once and W&B is turned off for
the rest of the run; metrics.jsonl is still written. Without network an online init gives up after
about INIT_TIMEOUT_S + 10 seconds (the environment variable WANDB_INIT_TIMEOUT overrides it).

A resumed run first drops the records logged after its checkpoint (`truncate`), and the final
evaluation replaces one at the same step, so metrics.jsonl holds one record per step and kind
however often the run was killed or re-run.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections as mlc
from absl import logging

INIT_TIMEOUT_S = 20.0


class MetricWriter:
  """Writes one JSON object per call to <workdir>/metrics.jsonl and mirrors it to W&B."""

  def __init__(self, workdir: str, cfg: mlc.ConfigDict, *, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.wandb = None
    if enabled and cfg.wandb.mode != "disabled":
      self.wandb = _init_wandb(workdir, cfg)

  def truncate(self, step: int) -> None:
    """Atomically drops the records with a step after `step`, any half-written line, and all
    but the last of records that repeat a (step, kind) (two runs that once shared a workdir)."""
    self._rewrite(lambda r: r["step"] <= step, dedupe=True)

  def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train",
            replace: bool = False) -> None:
    """Appends a record; `replace` first drops an earlier record of the same step and kind."""
    if not self.enabled:
      return
    if replace:
      self._rewrite(lambda r: (r["step"], r["kind"]) != (step, kind))
    record = {"step": int(step), "kind": kind, **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.wandb is not None:
      try:
        self.wandb.log(wandb_scalars(record), step=int(step))
      except Exception as e:  # W&B must never stop a run
        logging.warning("wandb.log failed (%s); W&B logging is off for this run", e)
        self.wandb = None

  def _rewrite(self, keep: Callable[[dict], bool], *, dedupe: bool = False) -> None:
    """Atomically rewrites metrics.jsonl with the records for which keep(record) holds
    (`dedupe`: of records with the same step and kind, only the last)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    kept = {}  # (step, kind) or line number -> line, in file order
    with open(self.path) as f:
      for number, line in enumerate(f):
        try:
          record = json.loads(line)
          if keep(record):
            key = (record["step"], record["kind"]) if dedupe else number
            kept.pop(key, None)  # a repeat moves to where the last one stood
            kept[key] = line if line.endswith("\n") else line + "\n"
        except (ValueError, KeyError, TypeError):
          pass  # a line cut short by a kill
    kept = list(kept.values())
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self.wandb is not None:
      try:
        self.wandb.finish()
      except Exception as e:
        logging.warning("wandb.finish failed: %s", e)


def wandb_scalars(record: dict) -> dict[str, Any]:
  """A metrics.jsonl record as W&B scalars "<kind>/<key>"; a list (per-step or per-depth values,
  histogram bins) becomes one scalar per entry, "<kind>/<key>/<i>", so W&B can chart it."""
  out = {}
  for key, value in record.items():
    if key in ("step", "kind"):
      continue
    name = f"{record['kind']}/{key}"
    if isinstance(value, list):
      out.update({f"{name}/{i}": x for i, x in enumerate(value)})
    else:
      out[name] = value
  return out


def _scalar(v: Any) -> Any:
  try:
    return float(v) if getattr(v, "ndim", 0) == 0 else [float(x) for x in v.reshape(-1)]
  except (TypeError, ValueError):
    return str(v)


def _init_wandb(workdir: str, cfg: mlc.ConfigDict):
  """A W&B run in cfg.wandb.mode, else (online failed) an offline one, else None."""
  modes = ["online", "offline"] if cfg.wandb.mode == "online" else [cfg.wandb.mode]
  for mode in modes:
    try:
      return _wandb_run(workdir, cfg, mode)
    except Exception as e:  # W&B must never stop a run
      why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
      then = "retrying offline" if mode != modes[-1] else "continuing with metrics.jsonl only"
      logging.warning("wandb.init(mode=%r) failed (%s); %s", mode, why, then)
  return None


def _wandb_run(workdir: str, cfg: mlc.ConfigDict, mode: str):
  import wandb

  w = cfg.wandb
  run_id_file = os.path.join(workdir, "wandb_run_id")
  run_id = open(run_id_file).read().strip() if os.path.exists(run_id_file) else None
  timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
  run = wandb.init(
      project=w.project, entity=w.entity or None, group=w.group or None,
      tags=[t for t in w.tags.split(",") if t] or None, mode=mode,
      name=w.name or os.path.basename(os.path.abspath(workdir)), dir=workdir,
      config=cfg.to_dict(), id=run_id, resume="allow",
      settings=wandb.Settings(init_timeout=timeout, silent=mode == "offline"))
  with open(run_id_file, "w") as f:
    f.write(run.id)
  return run
