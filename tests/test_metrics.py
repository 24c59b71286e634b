"""research/train/metrics.py: what W&B receives."""

from research.train import metrics


def test_wandb_scalars_split_lists_into_one_chart_per_entry():
  record = {"step": 7, "kind": "train", "loss": 2.5, "mor/depth_frac": [0.0, 0.5, 0.5],
            "note": "x"}
  assert metrics.wandb_scalars(record) == {
      "train/loss": 2.5, "train/mor/depth_frac/0": 0.0, "train/mor/depth_frac/1": 0.5,
      "train/mor/depth_frac/2": 0.5, "train/note": "x"}
