"""Metric sinks: metrics.jsonl in the workdir (always), Weights & Biases (best effort), stdout.

W&B never stops training: a failing init or log is reported once and W&B is turned off for the
rest of the run; metrics.jsonl is still written.
"""

import json
import os
from typing import Any

import ml_collections as mlc
from absl import logging


class MetricWriter:
  """Writes one JSON object per call to <workdir>/metrics.jsonl and mirrors it to W&B."""

  def __init__(self, workdir: str, cfg: mlc.ConfigDict, *, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.wandb = None
    if enabled and cfg.wandb.mode != "disabled":
      self.wandb = _init_wandb(workdir, cfg)

  def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.wandb is not None:
      try:
        self.wandb.log({f"{kind}/{k}": v for k, v in record.items() if k not in ("step", "kind")},
                       step=int(step))
      except Exception as e:  # W&B must never stop a run
        logging.warning("wandb.log failed (%s); W&B logging is off for this run", e)
        self.wandb = None

  def close(self) -> None:
    if self.wandb is not None:
      try:
        self.wandb.finish()
      except Exception as e:
        logging.warning("wandb.finish failed: %s", e)


def _scalar(v: Any) -> Any:
  try:
    return float(v) if getattr(v, "ndim", 0) == 0 else [float(x) for x in v.reshape(-1)]
  except (TypeError, ValueError):
    return str(v)


def _init_wandb(workdir: str, cfg: mlc.ConfigDict):
  w = cfg.wandb
  try:
    import wandb

    run_id_file = os.path.join(workdir, "wandb_run_id")
    run_id = open(run_id_file).read().strip() if os.path.exists(run_id_file) else None
    run = wandb.init(
        project=w.project, entity=w.entity or None, group=w.group or None,
        tags=[t for t in w.tags.split(",") if t] or None, mode=w.mode,
        name=w.name or os.path.basename(os.path.abspath(workdir)), dir=workdir,
        config=cfg.to_dict(), id=run_id, resume="allow")
    with open(run_id_file, "w") as f:
      f.write(run.id)
    return run
  except Exception as e:  # W&B must never stop a run
    logging.warning("wandb.init failed (%s: %s); continuing with metrics.jsonl only",
                    type(e).__name__, e)
    return None
