"""Every notebook runs as a user runs it (README, Notebooks): the project installed with
`pip install -e .` (here into a fresh venv over this interpreter's packages, so nothing outside the
test changes), then `jupyter nbconvert --execute` from the repository root with a relative
WORKDIR and no PYTHONPATH, on a fresh tiny MoR run (the README's first command, shrunk)."""

import glob
import json
import os
import subprocess
import sys

import nbformat
import pytest

from tests import launch_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.basename(p)
                   for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.fixture(scope="module")
def mor_workdir(tmp_path_factory) -> str:
  """A 4-step expert-choice MoR run (Nr = 3 over 5 layers) of the launcher tests' tiny shape."""
  path = tmp_path_factory.mktemp("notebook_run")
  launcher = launch_util.Launcher(path / "shared", config="configs/mor.py:tiny")
  result = launcher.run(path / "run", {"model.num_layers": 5, "train.steps": 4,
                                       "train.eval_every": 2})
  assert result.returncode == 0, result.stderr
  return str(path / "run")


@pytest.fixture(scope="module")
def moe_workdir(tmp_path_factory) -> str:
  """A 4-step Chain-of-Experts + ReXMoE run (C = 2, groups of 2 layers, PSR growing from step 1
  to 3): every section of the MoE notebook applies (its RMoE statistics hold for any router)."""
  path = tmp_path_factory.mktemp("moe_notebook_run")
  launcher = launch_util.Launcher(path / "shared", config="configs/moe.py:tiny,coe")
  result = launcher.run(path / "run", {
      "train.steps": 4, "model.moe.d_ff": 16, "model.moe.rex_group": 2, "model.moe.psr": True,
      "model.moe.psr_start": 1, "model.moe.psr_end": 3})
  assert result.returncode == 0, result.stderr
  return str(path / "run")


DEFAULT_WORKDIR = {"moe_routing.ipynb": "runs/moe_tiny"}  # else the README's first run


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> str:
  """The python of a venv that sees this interpreter's packages plus `pip install -e .` of the
  repository (the only way `research` reaches a kernel started in notebooks/)."""
  pytest.importorskip("nbconvert", reason="pip install -r requirements-dev.txt")
  venv = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", "."], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"pip install -e . failed:\n{r.stdout}{r.stderr}"
  return python


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_nbconvert_from_the_repository_root(name, request, venv_python,
                                                              tmp_path):
  workdir = request.getfixturevalue("moe_workdir" if name == "moe_routing.ipynb" else
                                    "mor_workdir")
  env = launch_util.user_env()  # not the tests' -O0
  env.pop("PYTHONPATH", None)
  env.update(WORKDIR=os.path.relpath(workdir, ROOT), MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
  # `jupyter nbconvert` run by the venv's python, so that the kernel is the venv's python too
  r = subprocess.run([venv_python, "-m", "nbconvert", "--to", "notebook", "--execute",
                      f"notebooks/{name}", "--output-dir", str(tmp_path),
                      "--ExecutePreprocessor.timeout=300"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  cells = nbformat.read(tmp_path / name, as_version=4).cells
  first = next(c for c in cells if c.cell_type == "code")
  printed = "".join(o.get("text", "") for o in first.outputs)
  # the relative WORKDIR was taken from the repository root, not from notebooks/
  assert printed.startswith(os.path.join(ROOT, os.path.relpath(workdir, ROOT))), printed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_default_to_the_readmes_first_run(name):
  default = DEFAULT_WORKDIR.get(name, "runs/mor_tiny")
  with open(os.path.join(ROOT, "README.md")) as f:
    assert f"--workdir={default}\n" in f.read()
  with open(os.path.join(ROOT, "notebooks", name)) as f:
    source = "".join("".join(c["source"]) for c in json.load(f)["cells"])
  assert f'os.environ.get("WORKDIR", "{default}")' in source
