"""Every notebook runs top to bottom (nbclient) against a small workdir made here."""

import glob
import json
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_workdir(path: str) -> str:
  """A workdir with the files a run leaves behind (config.json, metrics.jsonl)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model": {"num_layers": 2, "d_model": 32}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(10, 110, 10):
      f.write(json.dumps({"step": step, "kind": "train", "loss": 6 - step / 50, "mfu": 0.3,
                          "lr": 1e-3}) + "\n")
    f.write(json.dumps({"step": 100, "kind": "valid", "nll": 4.2}) + "\n")
  return path


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))))
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("WORKDIR", fake_workdir(str(tmp_path / "run")))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
