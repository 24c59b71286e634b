"""Every notebook runs top to bottom (nbclient) against a small workdir made here: a fake one
with metrics and config, or, for the notebooks that load a checkpoint, a real tiny run."""

import glob
import json
import os

import nbclient
import nbformat
import pytest

from tests import launch_util

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


def mor_run(path: str) -> str:
  """A 4-step expert-choice MoR run (Nr = 3 over 5 layers) of the launcher tests' tiny shape."""
  launcher = launch_util.Launcher(os.path.join(path, "shared"), config="configs/mor.py:tiny")
  result = launcher.run(os.path.join(path, "run"), {"model.num_layers": 5, "train.steps": 4})
  assert result.returncode == 0, result.stderr
  return os.path.join(path, "run")


def moe_run(path: str) -> str:
  """A 4-step Chain-of-Experts + ReXMoE run (C = 2, groups of 2 layers, PSR growing from step 1
  to 3): every section of the MoE notebook applies (its RMoE statistics hold for any router)."""
  launcher = launch_util.Launcher(os.path.join(path, "shared"), config="configs/moe.py:tiny,coe")
  result = launcher.run(os.path.join(path, "run"), {
      "train.steps": 4, "model.moe.d_ff": 16, "model.moe.rex_group": 2, "model.moe.psr": True,
      "model.moe.psr_start": 1, "model.moe.psr_end": 3})
  assert result.returncode == 0, result.stderr
  return os.path.join(path, "run")


# notebook -> the workdir it needs (default: fake_workdir)
RUNS = {"mor_routing.ipynb": mor_run, "moe_routing.ipynb": moe_run}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))))
def test_notebook_runs(path, tmp_path, monkeypatch):
  make_run = RUNS.get(os.path.basename(path), lambda p: fake_workdir(os.path.join(p, "run")))
  monkeypatch.setenv("WORKDIR", make_run(str(tmp_path)))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
