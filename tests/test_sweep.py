"""Tests of research/sweep.py: cells, configs, isoFLOP steps, cluster scripts, and a 2-cell tiny
sweep through launch.py that is interrupted, reported, resumed and reported again."""

import csv
import json
import os
import re
import signal
import subprocess
import time

import pytest
from matplotlib import image

from configs.ablations import vanilla_depth
from research import config as config_lib
from research import sweep
from research.train import loop
from tests import launch_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_PY = "launch.py"
SPEC = "configs/ablations/vanilla_depth.py:tiny"
# Tiny shapes for every cell; the budget gives the 4-layer cell 20 steps and the 2-layer one 40.
TINY = {"model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 1, "model.d_ff": 64,
        "data.seq_len": 32, "train.batch_size": 4, "data.bpe_vocab_size": 512,
        "data.shuffle_window": 64,
        "train.flop_budget": 2.31e8, "train.warmup_steps": 1, "train.eval_every": 4,
        "train.eval_batches": 2, "train.log_every": 1, "checkpoint.every": 2,
        "checkpoint.async_save": False, "train.progress": False, "wandb.mode": "disabled"}


def tiny_config():
  cfg = vanilla_depth.get_config("tiny")
  cfg.lock()
  return cfg


def launch(*args: str, env: dict, check: bool = True) -> str:
  r = launch_util.python_run([LAUNCH_PY, f"--config={SPEC}", *args], env=env, timeout=300)
  out = r.stdout + r.stderr
  assert not check or r.returncode == 0, out
  return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def env(cache):
  """Subprocess environment with a persistent compilation cache (a resumed cell compiles once)."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache / "jax"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# --- cells and configs --------------------------------------------------------------------------


def test_load_sweep_cells():
  cells = sweep.load_sweep("configs/ablations/vanilla_depth.py", "tiny")
  assert [c.name for c in cells] == ["L2_6e11", "L4_6e11"]
  assert cells[0].label == "Vanilla Tiny, 2 layers, 6e11 FLOPs"
  assert sweep.sweep_name(SPEC) == "vanilla_depth_tiny"
  assert sweep.parse_spec(SPEC) == ("configs/ablations/vanilla_depth.py", "tiny")
  with pytest.raises(config_lib.ConfigError, match="defines no get_sweep"):
    sweep.load_sweep("configs/vanilla.py", "tiny")


@pytest.mark.parametrize("cells, match", [
    ("[]", "returned no cells"),
    ("[sweep.Cell('a/b', 'x')]", "cell name 'a/b' must be a plain directory name"),
    ("[sweep.Cell('a', 'x'), sweep.Cell('a', 'y')]", "two cells are named 'a'"),
    ("[sweep.Cell('a', 'x', reference='b')]", "names reference 'b', which is no cell"),
])
def test_load_sweep_rejects_bad_cells(tmp_path, cells, match):
  path = tmp_path / "bad.py"
  path.write_text(f"from research import sweep\n\ndef get_sweep(arg):\n  return {cells}\n")
  with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
    sweep.load_sweep(str(path), None)


def test_cell_config_overrides_and_precedence():
  base = tiny_config()
  cell = sweep.Cell("c", "C", {"model.num_layers": 2, "train.flop_budget": 1e12})
  cfg = sweep.cell_config(base, cell, sweep="s")
  assert (cfg.model.num_layers, cfg.train.flop_budget) == (2, 1e12)
  assert (cfg.wandb.group, cfg.wandb.tags) == ("s", "c")
  assert base.model.num_layers == 4 and base.wandb.group == ""  # the base is untouched
  kept = sweep.cell_config(base, cell, keep={"train.flop_budget"})  # the command line wins
  assert (kept.model.num_layers, kept.train.flop_budget) == (2, 0.0)


@pytest.mark.parametrize("overrides, match", [
    ({"model.num_layer": 2}, "cell 'bad': unknown config key 'model.num_layer'"),
    ({"nope.x": 1}, "cell 'bad': unknown config key 'nope.x'"),
    ({"model": 1}, "cell 'bad': 'model' is a config section"),
    ({"train.steps": 2.5}, "cell 'bad': config.train.steps=2.5"),
])
def test_cell_config_errors_name_cell_and_key(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
    sweep.cell_config(tiny_config(), sweep.Cell("bad", "Bad", overrides))


def test_cell_configs_validate_each_cell():
  cells = [sweep.Cell("ok", "ok", {}), sweep.Cell("heads", "H", {"model.num_heads": 3})]
  error = re.escape("cell 'heads': config.model.num_heads=3")
  with pytest.raises(config_lib.ConfigError, match=error):
    sweep.cell_configs(tiny_config(), cells, "w", "s", ())
  long_warmup = [sweep.Cell("w", "W", {"train.steps": 10, "train.warmup_steps": 10})]
  error = re.escape("cell 'w': config.train.warmup_steps=10")
  with pytest.raises(config_lib.ConfigError, match=error):
    sweep.cell_configs(tiny_config(), long_warmup, "w", "s", ())


def test_isoflop_steps_and_warmup_follow_the_paper():
  """360M vanilla at 16.5e18 FLOPs: 9438 steps, warm-up 57 = 5% of the 2e18 run (mor.md §4.2)."""
  cells = vanilla_depth.get_sweep("360m")
  base = vanilla_depth.get_config("360m")
  full = {c.name: sweep.cell_config(base, c) for c in cells}
  assert loop.total_steps(full["L32_16.5e18"]) == 9438
  assert loop.total_steps(full["L32_2e18"]) == 1144
  assert {full[n].train.warmup_steps for n in ("L32_2e18", "L32_5e18", "L32_16.5e18")} == {57}
  assert loop.total_steps(full["L16_16.5e18"]) == 2 * 9438  # half the depth, twice the steps


def test_param_counts_match_the_paper():
  cfg = config_lib.with_derived(vanilla_depth.get_config("360m"), 49152)
  non_embedding, total = sweep.param_counts(cfg.model)
  assert round(non_embedding / 1e6) == 315  # paper Table 6: 315M non-embedding
  assert total - non_embedding == 49152 * 960


def test_config_args():
  argv = ["launch.py", "--config=x.py:tiny", "--config.a=1", "--config.b", "two words",
          "--sweep", "--workdir=w", "--config.c=x=y"]
  assert sweep.config_args(argv) == ["--config.a=1", "--config.b=two words", "--config.c=x=y"]


# --- cluster scripts ----------------------------------------------------------------------------


def test_emit_slurm_runs_the_array_task_cell(tmp_path, env):
  workdir = tmp_path / "sw"
  out = launch("--sweep_emit=slurm", f"--workdir={workdir}", "--config.train.lr=1e-3",
               "--config.data.cache_dir=/a dir", env=env)
  script = workdir / "sweep.slurm"
  assert "wrote" in out and script.exists()
  subprocess.run(["bash", "-n", str(script)], check=True)
  text = script.read_text()
  assert "#SBATCH --array=0-1" in text and "#SBATCH --ntasks-per-node=" in text
  # Run it with stand-ins for srun and python that print what they were asked to run.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool, body in (("srun", 'exec "$@"'), ("python", "printf '%s\\n' \"$@\"")):
    (bin_dir / tool).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / tool).chmod(0o755)
  r = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                     env=dict(env, PATH=f"{bin_dir}:{env['PATH']}", SLURM_ARRAY_TASK_ID="1"))
  assert r.stdout.splitlines() == ["launch.py", f"--config={SPEC}", f"--workdir={workdir}",
                                   "--config.train.lr=1e-3", "--config.data.cache_dir=/a dir",
                                   "--sweep_index=1"]


def test_emit_shell_runs_given_or_all_cells(tmp_path):
  cells = sweep.load_sweep("configs/ablations/vanilla_depth.py", "tiny")
  script = tmp_path / "sweep.sh"
  script.write_text(sweep.emit_shell(SPEC, "runs/x", cells, ["--config.seed=1"], REPO))
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python").write_text('#!/bin/bash\necho "${@: -1}"\n')
  (bin_dir / "python").chmod(0o755)
  path = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  run = lambda *a: subprocess.run(["bash", str(script), *a], capture_output=True, text=True,
                                  check=True, env=path).stdout.split()
  assert run() == ["--sweep_index=0", "--sweep_index=1"]
  assert run("1") == ["--sweep_index=1"]


# --- a tiny sweep end to end ----------------------------------------------------------------------


def read_csv(path) -> dict[str, dict]:
  with open(path) as f:
    return {r["cell"]: r for r in csv.DictReader(f)}


def test_tiny_sweep_runs_resumes_and_reports(tmp_path, cache, env):
  workdir = tmp_path / "sweep"
  args = [f"--workdir={workdir}", f"--config.data.cache_dir={cache / 'data'}",
          *(f"--config.{k}={v}" for k, v in TINY.items())]
  first, second = workdir / "L2_6e11", workdir / "L4_6e11"

  # Run the sweep; stop it with SIGTERM once the second cell has evaluated and checkpointed
  # step 4.
  log = str(tmp_path / "sweep.log")  # stdout and stderr
  proc = launch_util.python_popen([LAUNCH_PY, f"--config={SPEC}", "--sweep", *args], env=env,
                                  stdout=log, stderr=log)
  deadline = time.time() + 240
  ckpt = second / "checkpoints"
  while not (ckpt.is_dir() and any(p.name.isdigit() and int(p.name) >= 4
                                    for p in ckpt.iterdir())):
    assert proc.poll() is None, open(log).read()
    assert time.time() < deadline, "the second cell never checkpointed"
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  out = open(log).read()
  assert proc.returncode == 0, out
  assert "sweep stopped in cell L4_6e11" in out
  assert sweep.cell_status(str(first)) == "done"
  assert sweep.cell_status(str(second)) == "interrupted"
  saved = json.loads((second / "config.json").read_text())
  assert saved["wandb"]["group"] == "vanilla_depth_tiny" and "L4_6e11" in saved["wandb"]["tags"]

  # The report of a partial sweep (in-process, to save a start-up): the latest validation NLL.
  cells = sweep.load_sweep(*sweep.parse_spec(SPEC))
  cli = dict(TINY, **{"data.cache_dir": str(cache / "data")})
  cfg = sweep.cell_config(tiny_config(), sweep.Cell("cli", "the command line", cli))
  cfgs = sweep.cell_configs(cfg, cells, str(workdir), "vanilla_depth_tiny", keep=set(cli))
  rows = {r["cell"]: r for r in sweep.report(cells, cfgs, str(workdir), "partial")}
  assert rows["L2_6e11"]["status"] == "done" and rows["L4_6e11"]["status"] == "interrupted"
  assert rows["L4_6e11"]["steps"] < 20 and rows["L4_6e11"]["valid_nll"] > 0

  # Again: the finished cell is skipped, the interrupted one resumes from its checkpoint.
  out = launch("--sweep", *args, env=env)
  assert "cell L2_6e11: done, skipped" in out and "cell L4_6e11 (" in out and "resuming" in out
  assert json.loads((second / "done.json").read_text())["step"] == 20
  records = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"].count(1) == 1  # no restart
  assert sweep.run_cells(cells[1:], cfgs[1:], str(workdir)) == "ok"  # done: nothing to run

  out = launch("--report", *args, env=env)
  rows = read_csv(workdir / "results.csv")
  for name, steps in (("L2_6e11", 40), ("L4_6e11", 20)):
    r = rows[name]
    assert r["status"] == "done" and int(r["steps"]) == int(r["planned_steps"]) == steps
    assert int(r["tokens"]) == steps * 4 * 32
    assert 0 < float(r["valid_nll"]) < 10 and float(r["tokens_per_s"]) > 0
  # isoFLOP: both cells spent the same budget; 2 more layers, plus one final norm (d_model = 32)
  assert float(rows["L2_6e11"]["train_flops"]) == float(rows["L4_6e11"]["train_flops"])
  n2, n4 = (int(rows[n]["non_embedding_params"]) for n in ("L2_6e11", "L4_6e11"))
  assert n4 - n2 == n2 - 32
  md = (workdir / "results.md").read_text()
  assert md.count("| done |") == 2 and "Vanilla Tiny, 4 layers, 6e11 FLOPs" in md
  assert "![validation NLL against FLOPs](results.png)" in md
  png = image.imread(workdir / "results.png")
  assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 300


# --- the report on its own ----------------------------------------------------------------------


def _row(cell: str, label: str) -> dict:
  return dict(cell=cell, label=label, status="done", non_embedding_params=591_100, params=722_100,
              flops_per_token=1.8e6, steps=160, planned_steps=160, tokens=327_680,
              train_flops=6e11, valid_nll=5.2445, tokens_per_s=1000.0)


def test_results_md_rows_have_the_headers_columns_when_labels_hold_pipes():
  """mor_table3's labels join their columns with ' | ' (Model | Router | KV | ...)."""
  from configs.ablations import mor_table3
  rows = [_row(c.name, c.label) for c in mor_table3.get_sweep("tiny")]
  assert all(" | " in r["label"] for r in rows)
  table = [line for line in sweep.markdown_table(rows, "t").splitlines() if line.startswith("|")]
  columns = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
  assert columns == {12}, columns  # 11 columns between 12 unescaped pipes, on every line
  assert r"| MoR \| Expert \| Cache \| M-Cyc \| Nr=3 \| L=5 |" in table[2 + 5]


def test_report_refuses_a_workdir_where_no_cell_has_results(tmp_path, cache, env):
  cells = sweep.load_sweep(*sweep.parse_spec(SPEC))
  cfgs = sweep.cell_configs(tiny_config(), cells, str(tmp_path), "s", ())
  missing = tmp_path / "typo"
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"--workdir={missing}: no such dir")):
    sweep.report(cells, cfgs, str(missing), "t")
  assert not missing.exists()
  empty = tmp_path / "empty"
  (empty / cells[0].name / "checkpoints").mkdir(parents=True)  # a cell started, nothing logged
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"--workdir={empty}: no cell has")):
    sweep.report(cells, cfgs, str(empty), "t")
  assert sorted(p.name for p in empty.iterdir()) == [cells[0].name]  # nothing written

  r = launch_util.python_run([LAUNCH_PY, f"--config={SPEC}", "--report", f"--workdir={missing}",
                              f"--config.data.cache_dir={cache / 'data'}"], env=env, timeout=300)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: --workdir={missing}: no such"), (
      r.stderr)
  assert not missing.exists()


def test_report_plans_the_steps_with_the_training_loops_function(tmp_path, monkeypatch):
  """Steps planned = loop.total_steps, the count training runs (docs/results/mor.md)."""
  cells = [sweep.Cell("a", "A | 2 layers", {})]
  cfg = sweep.cell_config(tiny_config(), sweep.Cell("cli", "the command line", TINY))
  cfgs = sweep.cell_configs(cfg, cells, str(tmp_path), "s", ())
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "metrics.jsonl").write_text(
      json.dumps({"kind": "train", "step": 3, "loss": 5.0}) + "\n"
      + json.dumps({"kind": "valid", "step": 3, "nll": 5.5}) + "\n")
  budgets = []
  monkeypatch.setattr(loop, "total_steps", lambda c: budgets.append(c.train.flop_budget) or 12345)
  rows = sweep.report(cells, cfgs, str(tmp_path), "t")
  assert rows[0]["planned_steps"] == 12345 and budgets == [TINY["train.flop_budget"]]
  assert "| 3/12345 |" in (tmp_path / "results.md").read_text()
  assert r"| a | A \| 2 layers | pending |" in (tmp_path / "results.md").read_text()


# --- seeds ---------------------------------------------------------------------------------------


def test_with_seeds_runs_every_cell_once_per_seed_seed_major():
  cells = [sweep.Cell("a", "A", {"model.num_layers": 2}), sweep.Cell("b", "B", {})]
  runs = sweep.with_seeds(cells, [0, 3])
  assert [r.name for r in runs] == ["a_seed0", "b_seed0", "a_seed3", "b_seed3"]
  assert [r.group for r in runs] == ["a", "b", "a", "b"]
  assert runs[2].overrides == {"model.num_layers": 2, "seed": 3} and runs[2].label == "A"
  assert cells[0].overrides == {"model.num_layers": 2}  # the cells themselves are untouched
  assert sweep.with_seeds(cells, []) == cells
  with pytest.raises(config_lib.ConfigError, match="distinct"):
    sweep.with_seeds(cells, [1, 1])
  with pytest.raises(config_lib.ConfigError, match=re.escape("cell 'c' sets config.seed itself")):
    sweep.with_seeds([sweep.Cell("c", "C", {"seed": 2})], [0, 1])


def test_seeded_report_tables_the_mean_each_seed_and_the_spread(tmp_path):
  cells = sweep.with_seeds([sweep.Cell("a", "A | x", {}), sweep.Cell("b", "B", {})], [0, 1])
  cfg = sweep.cell_config(tiny_config(), sweep.Cell("cli", "the command line", TINY))
  cfgs = sweep.cell_configs(cfg, cells, str(tmp_path), "s", ())
  assert [c.seed for c in cfgs] == [0, 0, 1, 1]
  nll = {"a_seed0": 5.0, "b_seed0": 4.0, "a_seed1": 5.5}  # b_seed1 has not evaluated yet
  for name, value in nll.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text(
        json.dumps({"kind": "valid", "step": 3, "nll": value}) + "\n")
  rows = sweep.report(cells, cfgs, str(tmp_path), "t")
  assert [(r["group"], r["seed"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
  groups = {g["cell"]: g for g in sweep.seed_rows(rows)}
  assert groups["a"]["mean_nll"] == pytest.approx(5.25)
  assert groups["a"]["spread"] == pytest.approx(0.5)
  assert groups["b"]["mean_nll"] == 4.0 and groups["b"]["spread"] is None
  md = (tmp_path / "results.md").read_text()
  assert r"| a | A \| x | partial | 5.2500 | s0: 5.0000, s1: 5.5000 | 0.5000 |" in md
  assert "| b | B | partial | 4.0000 | s0: 4.0000, s1: - | - |" in md
  assert "| b | B | -1.0000 | - | s0: -1.0000 | - |" in md  # only seed 0 is paired
  assert read_csv(tmp_path / "results.csv")["a_seed1"]["group"] == "a"


def test_paired_rows_difference_each_cell_from_the_first_seed_by_seed():
  def row(group, seed, nll):
    return dict(group=group, seed=seed, valid_nll=nll, label=group.upper(), status="done")
  rows = [row("ref", 0, 5.0), row("lo", 0, 4.5), row("mix", 0, 5.5), row("ref", 1, 4.0),
          row("lo", 1, 3.9), row("mix", 1, 3.0), row("ref", 2, None), row("lo", 2, 1.0),
          row("mix", 2, 9.0)]
  pairs = {p["cell"]: p for p in sweep.paired_rows(rows)}
  assert list(pairs) == ["lo", "mix"] and pairs["lo"]["reference"] == "ref"
  assert pairs["lo"]["diffs"] == pytest.approx({0: -0.5, 1: -0.1})  # seed 2: no reference NLL
  assert pairs["lo"]["mean_diff"] == pytest.approx(-0.3) and pairs["lo"]["sign"] == "lower"
  assert pairs["lo"]["se"] == pytest.approx(0.2)  # stdev(-0.5, -0.1) = 0.2828, / sqrt(2)
  assert pairs["mix"]["diffs"] == pytest.approx({0: 0.5, 1: -1.0})
  assert pairs["mix"]["sign"] == "mixed"
  table = sweep.paired_table(rows)
  assert "| lo | LO | -0.3000 | 0.2000 | s0: -0.5000, s1: -0.1000 | lower |" in table


def test_sweep_seeds_through_launch_py(tmp_path, cache, env):
  """--sweep_seeds lists (and emits) one run per cell and seed; bad lists fail with one line."""
  args = [f"--workdir={tmp_path}", f"--config.data.cache_dir={cache / 'data'}"]
  out = launch("--sweep_list", "--sweep_seeds=0,1", *args, env=env)
  names = [line.split()[1] for line in out.splitlines() if re.match(r"\s*\d+\s", line)]
  assert names == ["L2_6e11_seed0", "L4_6e11_seed0", "L2_6e11_seed1", "L4_6e11_seed1"], out
  launch("--sweep_emit=slurm", "--sweep_seeds=0,1", *args, env=env)
  script = (tmp_path / "sweep.slurm").read_text()
  assert "#SBATCH --array=0-3" in script and "--sweep_seeds=0,1" in script
  for bad, needle in ((["--sweep_list", "--sweep_seeds=0,x"], "--sweep_seeds=0,x: expected"),
                      (["--sweep_list", "--sweep_seeds=0,1", "--config.seed=4"],
                       "--sweep_seeds and --config.seed both set the seed"),
                      (["--sweep_seeds=0,1"], "--sweep_seeds: only for a sweep")):
    out = launch(*bad, *args, env=env, check=False)
    assert out.strip().splitlines()[-1].startswith("error: ") and needle in out, out


def test_report_tables_the_router_statistics_of_the_last_tenth_over_seeds(tmp_path):
  """router_stats: each logged routing key averaged over the last 10 % of the train records;
  router_table: the mean over a cell's seeds, vectors per entry; no table when none logged."""
  train = [{"kind": "train", "step": s, "mor/threshold_acc": [s, 2 * s], "mor/depth_frac":
            [0.5, 0.5], "loss": 1.0} for s in range(1, 21)]
  got = sweep.router_stats(train)
  assert got == {"mor/threshold_acc": [19.5, 39.0], "mor/depth_frac": [0.5, 0.5]}  # steps 19, 20
  assert sweep.router_stats(train[:3]) == {"mor/threshold_acc": [3.0, 6.0],
                                           "mor/depth_frac": [0.5, 0.5]}
  rows = [dict(group="a", label="A | x", router={"mor/threshold_acc": [0.9, 0.8]}),
          dict(group="a", label="A | x", router={"mor/threshold_acc": [0.7, 0.6]}),
          dict(group="b", label="B", router={"mor/maxvio": [0.25]})]
  table = sweep.router_table(rows)
  assert "| Cell | Model | seeds | mor/threshold_acc | mor/maxvio |" in table
  assert r"| a | A \| x | 2 | 0.800 / 0.700 | - |" in table
  assert "| b | B | 1 | - | 0.250 |" in table
  assert sweep.router_table([dict(group="c", label="C", router={})]) == ""


def test_mor_sharing_at_8_layers_gives_every_recursive_cell_its_own_layer_order():
  """Table 10 at tiny's 4 layers has cells that are the same model (same plan); tiny_l8 has
  none, and every cell's config validates."""
  from configs.ablations import mor_sharing
  from research.model import recursion

  def plans(arg):
    base = mor_sharing.get_config(arg)
    out = {}
    for cell in mor_sharing.get_sweep(arg):
      cfg = sweep.cell_config(base, cell)
      config_lib.validate(cfg)
      r = cfg.model.recursion
      if r.strategy != "none":
        p = recursion.make_plan(r.strategy, cfg.model.num_layers, r.num_recursions)
        out[cell.name] = (p.prelude, p.order, p.coda)
    return out

  tiny, deep = plans("tiny"), plans("tiny_l8")
  assert tiny["middle_cycle_nr2"] == tiny["middle_sequence_nr2"]
  assert tiny["cycle_nr3"] == tiny["sequence_nr3"]
  assert len(deep) == 8 and len(set(deep.values())) == 8
  assert mor_sharing.get_config("tiny_l8").model.num_layers == 8
  assert [c.name for c in mor_sharing.get_sweep("tiny_l8")][:3] == [
      "vanilla_L8", "vanilla_L4", "vanilla_L2"]
  with pytest.raises(ValueError, match="tiny_l8"):
    mor_sharing.get_sweep("tiny_l9")


def test_paired_rows_read_each_cell_against_its_own_reference():
  """Cells naming a reference are paired with it (two tables' final designs, as in mor_routers);
  a reference is not paired with itself; a reference that is no cell is refused."""
  def row(group, seed, nll, ref=""):
    return dict(group=group, seed=seed, valid_nll=nll, label=group.upper(), status="done",
                reference=ref)
  rows = [row(g, s, nll + s, ref) for s in (0, 1) for g, nll, ref in (
      ("e1", 5.0, "e_final"), ("e_final", 4.0, "e_final"), ("t1", 3.0, "t_final"),
      ("t_final", 3.5, "t_final"))]
  pairs = {p["cell"]: p for p in sweep.paired_rows(rows)}
  assert set(pairs) == {"e1", "t1"}
  assert pairs["e1"]["reference"] == "e_final" and pairs["e1"]["mean_diff"] == pytest.approx(1.0)
  assert pairs["t1"]["reference"] == "t_final" and pairs["t1"]["mean_diff"] == pytest.approx(-0.5)
  table = sweep.paired_table(rows)
  assert "## Paired by seed, against its reference" in table
  assert "| e1 | E1 | e_final | +1.0000 | 0.0000 | s0: +1.0000, s1: +1.0000 | higher |" in table
  with pytest.raises(ValueError, match="not cells"):
    sweep.paired_rows([row("a", 0, 1.0, "gone")])
  # the report's rows carry the reference (with_seeds keeps it)
  cells = sweep.with_seeds([sweep.Cell("a", "A", reference="b"), sweep.Cell("b", "B")], [0, 1])
  assert [c.reference for c in cells] == ["b", "", "b", ""]
