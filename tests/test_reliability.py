"""Failure tests of the full command (docs/reliability.md): real launch.py processes are stopped by
signals, killed with SIGKILL, fed corrupted checkpoints, bad configs and data, non-finite steps and
a W&B that cannot connect. Resumed runs must log the same per-step losses, bit for bit, as an
uninterrupted run.
"""

import concurrent.futures
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import time

import pytest

from configs import base
from research.train import metrics as metrics_lib
from tests.launch_util import (
    Launcher,
    checkpoint_steps,
    finish,
    read_metrics,
    train_losses,
    wait_for_step,
)

# Every resumed run is compared with one uninterrupted run of these settings (checkpoints at
# 36, 42, 48, 54, 60 at its end).
RUN = {"train.steps": 60, "checkpoint.every": 6, "checkpoint.keep": 5}
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Launcher:
  return Launcher(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def reference(launcher, tmp_path_factory) -> tuple:
  """(workdir, step -> loss) of an uninterrupted run of RUN."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  r = launcher.run(workdir, RUN)
  assert r.returncode == 0, r.stderr
  losses = train_losses(r.metrics)
  assert sorted(losses) == list(range(1, 61))
  return workdir, losses


def stop_line(stdout: str, sig: str) -> int:
  """The step of the one-line "stopped by SIG at step N; checkpoint saved in ..." message."""
  m = re.search(rf"^stopped by {sig} at step (\d+); checkpoint saved in \S+$", stdout, re.M)
  assert m, stdout
  return int(m.group(1))


def tmp_dirs(workdir) -> list[str]:
  return [d for d in os.listdir(workdir / "checkpoints") if TMP_SUFFIX in d]


# --- 1. SIGTERM / SIGINT ------------------------------------------------------------------------


def test_sigterm_and_sigint_checkpoint_exit_0_and_resume_exactly(launcher, reference, tmp_path):
  workdir = tmp_path / "run"
  rng = random.Random(0)
  for sig in (signal.SIGTERM, signal.SIGINT):
    proc = launcher.start(workdir, RUN)
    target = max(train_losses(read_metrics(workdir)), default=0) + rng.randint(3, 12)
    wait_for_step(proc, workdir, target)
    proc.send_signal(sig)
    r = finish(proc, workdir)
    assert r.returncode == 0, r.stderr
    step = stop_line(r.stdout, sig.name)
    assert f"{sig.name}: stopping after the current step" in r.stderr
    assert target <= step < RUN["train.steps"]
    assert step in checkpoint_steps(workdir)
    assert max(train_losses(r.metrics)) == step  # metrics.jsonl is complete up to the checkpoint
  r = launcher.run(workdir, RUN)
  assert r.returncode == 0, r.stderr
  assert train_losses(r.metrics) == reference[1]


def test_signal_during_setup_or_compilation_stops_cleanly(launcher, reference, tmp_path):
  workdir = tmp_path / "run"
  # A cold compilation cache: the first step compiles for seconds, so the signal lands in set-up
  # or in the compilation of the first step.
  proc = launcher.start(workdir, RUN, env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cold")})
  deadline = time.monotonic() + 120
  while not (workdir / "config.json").exists():  # end of set-up, before the step compiles
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  r = finish(proc, workdir)
  assert r.returncode == 0, r.stderr
  step = stop_line(r.stdout, "SIGINT")
  assert step <= 1 and checkpoint_steps(workdir) == [step]
  # A step-0 checkpoint holds a packer with no leftover tokens, grain's (-1, -1) (issue 15 item 1).
  r = launcher.run(workdir, RUN)
  assert r.returncode == 0, r.stderr
  assert train_losses(r.metrics) == reference[1]


# --- 2. SIGKILL anywhere, a second signal -------------------------------------------------------


def test_sigkill_and_abort_at_random_points_resume_exactly(launcher, reference, tmp_path):
  workdir = tmp_path / "run"
  overrides = dict(RUN, **{"checkpoint.every": 3})  # an asynchronous write is nearly always on
  rng = random.Random(1)
  partial = []
  for kill in ("SIGKILL", "SIGKILL", "SIGTERM+SIGINT"):
    proc = launcher.start(workdir, overrides)
    target = max(train_losses(read_metrics(workdir)), default=0) + rng.randint(3, 12)
    wait_for_step(proc, workdir, target)
    time.sleep(rng.uniform(0.0, 0.02))
    if kill == "SIGKILL":
      proc.kill()
      proc.wait()
    else:  # the second signal aborts at once, without a checkpoint
      proc.send_signal(signal.SIGTERM)
      proc.send_signal(signal.SIGINT)
      r = finish(proc, workdir)
      assert r.returncode == 130, r.stderr
      assert "aborting without a checkpoint" in r.stderr
    partial += tmp_dirs(workdir)
  assert partial, "no kill interrupted a checkpoint write"
  r = launcher.run(workdir, overrides)
  assert r.returncode == 0, r.stderr
  assert train_losses(r.metrics) == reference[1]  # one record per step, bit-identical losses
  assert not tmp_dirs(workdir)  # partial writes were cleaned up


# --- 3. corrupted checkpoints, restore_from -----------------------------------------------------


def largest_file(directory) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def edit_meta(step_dir, change) -> None:
  path = step_dir / "meta" / "metadata"
  with open(path) as f:
    meta = json.load(f)
  change(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


def test_corrupted_checkpoints_are_skipped_named_and_moved_aside(launcher, reference, tmp_path):
  ref_dir, ref_losses = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  ckpt = workdir / "checkpoints"
  assert checkpoint_steps(workdir) == [36, 42, 48, 54, 60]
  array_file = largest_file(ckpt / "60" / "state")
  os.truncate(array_file, os.path.getsize(array_file) // 2)  # truncated array data
  os.remove(ckpt / "54" / "data" / "process_0-of-1.json")  # the data-iterator state is gone
  (ckpt / "48" / "meta" / "metadata").write_text('{"step": 4')  # cut-off JSON
  edit_meta(ckpt / "42", lambda m: m.update(state_checksum=m["state_checksum"] ^ 1))  # bit flip
  shutil.copytree(ckpt / "36", ckpt / f"66{TMP_SUFFIX}")  # an unfinished write
  r = launcher.run(workdir, RUN)
  assert r.returncode == 0, r.stderr
  log = workdir / "errors.log"
  for step in (60, 54, 48, 42):
    assert f"checkpoint {ckpt / str(step)} is unreadable and was skipped" in r.stderr
    assert any(d.startswith(f"{step}.unreadable-") for d in os.listdir(ckpt))
    assert f"checkpoint {ckpt / str(step)} is unreadable:\nTraceback" in log.read_text()
  skipped = [line for line in r.stderr.splitlines() if "is unreadable and was skipped" in line]
  assert len(skipped) == 4 and all(f"traceback in {log}" in line for line in skipped)
  assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 10, r.stderr
  assert "checksum" in r.stderr
  assert f"removing {ckpt / f'66{TMP_SUFFIX}'}: a checkpoint write that did not finish" in r.stderr
  assert not tmp_dirs(workdir)
  assert checkpoint_steps(workdir) == [36, 42, 48, 54, 60]  # rewritten from step 36 on
  assert train_losses(r.metrics) == ref_losses  # the data iterator came from step 36 too


def test_restore_from_loads_that_checkpoint_once(launcher, reference, tmp_path):
  ref_dir, ref_losses = reference
  workdir = tmp_path / "run"
  overrides = dict(RUN, **{"checkpoint.restore_from": ref_dir / "checkpoints" / "48"})
  r = launcher.run(workdir, overrides)
  assert r.returncode == 0, r.stderr
  assert train_losses(r.metrics) == {k: v for k, v in ref_losses.items() if k > 48}
  r = launcher.run(workdir, overrides)  # a restart resumes the run's own checkpoints
  assert r.returncode == 0, r.stderr
  assert "restore_from" in r.stderr and "is ignored" in r.stderr
  assert r.stdout.startswith("step 60: validation nll")
  assert [m["step"] for m in r.metrics if m["kind"] == "valid"] == [60]  # replaced, not repeated


# --- 4. non-finite loss or gradients ------------------------------------------------------------

NONFINITE = {"train.steps": 12, "checkpoint.every": 5, "train.warmup_steps": 0, "train.lr": 1e30}


def test_nonfinite_stop_saves_the_last_good_state(launcher, tmp_path):
  workdir = tmp_path / "run"
  r = launcher.run(workdir, NONFINITE)
  assert r.returncode == 1
  assert ("non-finite loss, gradient or update at step 2; stopped with the last good state "
          "(step 1) saved in") in r.stdout
  assert checkpoint_steps(workdir) == [1]
  assert [(m["step"], m["finite"]) for m in r.metrics] == [(1, 1.0), (2, 0.0)]
  # It loads: restoring checks that every value is finite and matches the recorded checksum.
  r = launcher.run(workdir, dict(NONFINITE, mode="eval"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("step 1: validation nll")


def test_nonfinite_skip_counts_then_stops(launcher, tmp_path):
  workdir = tmp_path / "run"
  r = launcher.run(workdir, dict(NONFINITE, **{"train.nonfinite": "skip",
                                               "train.max_skipped": 3}))
  assert r.returncode == 1
  assert "config.train.max_skipped=3 non-finite steps in a row at step 4" in r.stdout
  assert "step 2: non-finite loss, gradient or update; update skipped (1 in a row)" in r.stderr
  train = [m for m in r.metrics if m["kind"] == "train"]
  assert [(m["step"], m["skipped"]) for m in train] == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
  assert checkpoint_steps(workdir) == [5]


def test_an_overflowing_update_is_never_checkpointed(launcher, tmp_path):
  """lr = inf in float32: loss and gradient are finite, the updated weights are not. The step
  rejects the update, so the run stops with the last good (initial) state checkpointed."""
  workdir = tmp_path / "run"
  r = launcher.run(workdir, dict(NONFINITE, **{"train.lr": 1e39}))
  assert r.returncode == 1
  assert "at step 1" in r.stdout and "last good state (step 0)" in r.stdout
  assert checkpoint_steps(workdir) == [0]  # checkpoint.save refuses any NaN/Inf state


# --- 5. bad input -------------------------------------------------------------------------------


BAD_INPUTS = ["mistyped key", "heads vs dims", "sharing vs depth", "capacities",
              "mesh vs devices", "missing data", "empty data", "missing restore_from",
              "restore_from not a step", "tokenizer mismatch", "workdir config changed",
              "changed and allowed", "no loadable checkpoint", "checkpoints emptied",
              "unknown preset", "missing config file", "workdir is a file", "wrong-type override",
              "bad record mid-file"]
COPIES = ("workdir config changed", "changed and allowed", "no loadable checkpoint")  # of reference


def bad_inputs(tmp, ref_dir) -> dict[str, tuple[dict, str]]:
  """name -> (overrides, the text the one-line error must hold)."""
  (tmp / "empty.jsonl").write_text("")
  good = [json.dumps({"text": f"document {i} " * 20}) for i in range(40)]
  (tmp / "good.jsonl").write_text("\n".join(good) + "\n")
  (tmp / "bad.jsonl").write_text("\n".join([*good[:2], '{"text": "cut', *good]) + "\n")
  changed = dict(RUN, **{"model.d_ff": 128})
  return {
      "mistyped key": ({"model.num_head": 2}, '--config.model.num_head: no such config key. '
                       'Did you mean "num_heads"'),
      "heads vs dims": ({"model.num_heads": 3}, "config.model.num_heads=3: must divide "
                        "config.model.d_model=32"),
      "sharing vs depth": ({"model.recursion.strategy": "cycle",
                            "model.recursion.num_recursions": 3},
                           "num_layers must be a positive multiple of "
                           "config.model.recursion.num_recursions=3"),
      "capacities": ({"model.recursion.strategy": "cycle", "model.recursion.num_recursions": 2,
                      "model.mor.kind": "expert", "model.mor.capacity": "(1.0,)"},
                     "needs one capacity per recursion"),
      "mesh vs devices": ({"mesh.data": 2}, "2 devices, but 1 are available"),
      "missing data": ({"data.source": "jsonl", "data.train_files": str(tmp / "none*.jsonl")},
                       "no file matches this glob"),
      "empty data": ({"data.source": "jsonl", "data.train_files": str(tmp / "empty.jsonl")},
                     "empty.jsonl holds no JSON lines"),
      "missing restore_from": ({"checkpoint.restore_from": str(tmp / "nowhere")},
                               "no such checkpoint directory"),
      "restore_from not a step": ({"checkpoint.restore_from": str(ref_dir / "checkpoints")},
                                  "not a checkpoint step directory"),
      "tokenizer mismatch": (
          {**RUN, "data.bpe_vocab_size": 640,
           "checkpoint.restore_from": str(ref_dir / "checkpoints" / "60")},
          "gives 640 tokens but the checkpoint at step 60 was trained with a 512-token tokenizer"),
      "workdir config changed": (changed, "holds a run with a different config (model.d_ff: "
                                 "64 -> 128)"),
      "changed and allowed": ({**changed, "allow_config_change": True},
                              "holds another model than the config builds"),
      "no loadable checkpoint": (RUN, "could be loaded (each is named in a warning above)"),
      "checkpoints emptied": (RUN, f"--workdir={tmp / 'checkpoints emptied'}: its checkpoints "
                              "are gone"),
      "unknown preset": ({"config_spec": "configs/mor.py:huge"},
                         "--config=configs/mor.py:huge: unknown preset 'huge'"),
      "missing config file": ({"config_spec": "configs/nope.py"},
                              "--config=configs/nope.py: no such file"),
      "workdir is a file": ({}, f"--workdir={tmp / 'workdir is a file'}: is a file, not a "
                            "directory"),
      "wrong-type override": ({"train.steps": "ten"},
                              "error: config.train.steps='ten': "),
      "bad record mid-file": ({"data.source": "jsonl", "data.train_files": str(tmp / "bad.jsonl"),
                               "data.valid_files": str(tmp / "good.jsonl")},
                              f"{tmp / 'bad.jsonl'} line 3: not a JSON line"),
  }


@pytest.fixture(scope="module")
def bad_input_results(launcher, reference, tmp_path_factory) -> dict:
  """Runs every bad input at once (4 processes at a time) into its own workdir."""
  tmp = tmp_path_factory.mktemp("bad")
  cases = bad_inputs(tmp, reference[0])
  assert list(cases) == BAD_INPUTS
  for name in COPIES:
    shutil.copytree(reference[0], tmp / name)
  broken = tmp / "no loadable checkpoint" / "checkpoints"
  for step in checkpoint_steps(broken.parent):
    (broken / str(step) / "meta" / "metadata").write_text("")
  shutil.copytree(reference[0], tmp / "checkpoints emptied")
  for step in checkpoint_steps(tmp / "checkpoints emptied"):
    shutil.rmtree(tmp / "checkpoints emptied" / "checkpoints" / str(step))
  (tmp / "workdir is a file").write_text("")

  def run(name):
    overrides = dict(cases[name][0])
    return launcher.run(tmp / name, overrides, config=overrides.pop("config_spec", None))

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = dict(zip(cases, pool.map(run, cases), strict=True))
  return {name: (tmp / name, results[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_fast_with_one_clear_line(name, bad_input_results):
  workdir, r, needle = bad_input_results[name]
  assert r.returncode == 1
  assert "Traceback" not in r.stderr, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and needle in last, r.stderr
  assert name in COPIES or not checkpoint_steps(workdir)


def test_refused_checkpoints_are_left_alone(bad_input_results, reference):
  saved_config = (reference[0] / "config.json").read_text()
  for name in COPIES:
    workdir, _, _ = bad_input_results[name]
    assert checkpoint_steps(workdir) == [36, 42, 48, 54, 60]
    assert not [d for d in os.listdir(workdir / "checkpoints") if "unreadable" in d]
    assert (workdir / "config.json").read_text() == saved_config  # a refused run writes nothing
    assert not (workdir / "lock").exists()


def test_emptied_checkpoints_start_over_only_when_told(launcher, bad_input_results):
  """Also the start-up lines: the step count a FLOP budget gave (6.7 steps' worth: 6, floored)
  and the line before the first step compiles."""
  from configs import vanilla
  from research.train import loop
  from tests.launch_util import TINY

  workdir, _, _ = bad_input_results["checkpoints emptied"]
  assert max(train_losses(read_metrics(workdir))) == 60  # the refused run dropped nothing
  cfg = vanilla.get_config("tiny")
  cfg.model.update({k.split(".")[1]: v for k, v in TINY.items() if k.startswith("model.")})
  cfg.data.seq_len, cfg.train.batch_size = TINY["data.seq_len"], TINY["train.batch_size"]
  budget = 6.7 * loop.flops_per_step(cfg)
  r = launcher.run(workdir, dict(RUN, **{"train.flop_budget": budget, "train.start_over": True}))
  assert r.returncode == 0, r.stderr
  assert "starts again from step 0" in r.stderr
  assert sorted(train_losses(r.metrics)) == list(range(1, 7))
  assert f"config.train.flop_budget={budget:g}: 6 steps of " in r.stderr, r.stderr
  assert "compiling the training step (step 1 of 6 follows) ..." in r.stderr


def test_bad_data_records_can_be_skipped_and_counted(launcher, bad_input_results):
  workdir, _, _ = bad_input_results["bad record mid-file"]
  bad = workdir.parent / "bad.jsonl"
  r = launcher.run(workdir, {"data.source": "jsonl", "data.train_files": str(bad),
                             "data.valid_files": str(workdir.parent / "good.jsonl"),
                             "data.skip_bad_records": True, "train.steps": 30})
  assert r.returncode == 0, r.stderr
  train = [m for m in r.metrics if m["kind"] == "train"]
  assert train[-1]["bad_records"] >= 1  # the cut-off line, met once per epoch
  assert f"skipping {bad} line 3" in r.stderr


# --- 5b. the workdir lock, changed schedule keys ------------------------------------------------


def test_a_second_launch_is_refused_and_a_stale_lock_taken_over(launcher, tmp_path):
  workdir = tmp_path / "run"
  long_run = {"train.steps": 100_000, "checkpoint.every": 3, "checkpoint.keep": 2}
  first = launcher.start(workdir, long_run)
  try:
    wait_for_step(first, workdir, 10)
    second = launcher.run(workdir, long_run)
    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --workdir={workdir}: in use by process {first.pid} on host "
                           f"{socket.gethostname()}"), second.stderr
    assert "Traceback" not in second.stderr and "removing" not in second.stderr
    assert first.poll() is None  # untouched: its in-flight checkpoint writes were not deleted
  finally:
    first.kill()
    first.wait()
  resume_at = max(checkpoint_steps(workdir))
  r = launcher.run(workdir, dict(long_run, **{"train.steps": resume_at + 3, "train.lr": 0.002}))
  assert r.returncode == 0, r.stderr
  assert f"took over the lock {workdir / 'lock'} of process {first.pid}" in r.stderr
  assert (f"resuming {workdir} at step {resume_at} with changed run-shaping keys: "
          "train.lr: 0.003 -> 0.002; train.steps: 100000 -> " in r.stderr), r.stderr
  assert sorted(train_losses(r.metrics)) == list(range(1, resume_at + 4))  # no step twice
  assert not (workdir / "lock").exists()


# --- 5c. a full disk ----------------------------------------------------------------------------


def test_a_full_disk_stops_the_run_at_the_failed_save(launcher, tmp_path, monkeypatch):
  """ENOSPC from the data-iterator write of the third checkpoint (a real full disk also fails
  tensorstore's array writes; checked by hand on a 3 MB tmpfs, docs/reliability.md)."""
  import grain

  from configs import vanilla
  from research.train import checkpoint, loop
  from tests.launch_util import TINY

  calls = []
  original = grain.checkpoint.CheckpointHandler.save

  def save(self, directory, *args, **kwargs):
    calls.append(directory)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", save)
  cfg = vanilla.get_config("tiny")
  for key, value in dict(TINY, **{"train.steps": 60, "checkpoint.every": 10,
                                 "data.cache_dir": os.path.join(launcher.shared_dir, "data")}
                         ).items():
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(checkpoint.CheckpointWriteError) as failure:
    loop.train(cfg, str(workdir))
  message = str(failure.value)
  assert "\n" not in message
  assert message.startswith(f"{workdir / 'checkpoints' / '30'}: the checkpoint of step 30 could "
                            "not be written: no space left on device; the complete checkpoints "
                            "(newest: step 20) are intact"), message
  assert checkpoint_steps(workdir) == [10, 20]
  assert max(train_losses(read_metrics(workdir))) < 40  # stopped before the next save
  assert not (workdir / "lock").exists()


# --- 6. W&B -------------------------------------------------------------------------------------


def test_wandb_online_without_network_still_trains(launcher, tmp_path):
  workdir = tmp_path / "run"
  env = {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
         "WANDB_INIT_TIMEOUT": "2", "WANDB_MODE": None, "HOME": str(tmp_path)}
  t0 = time.monotonic()
  r = launcher.run(workdir, dict(RUN, **{"checkpoint.every": 0, "wandb.mode": "online"}), env=env)
  assert r.returncode == 0, r.stderr
  assert "wandb.init(mode='online') failed" in r.stderr and "retrying offline" in r.stderr
  assert sorted(train_losses(r.metrics)) == list(range(1, 61))
  assert os.listdir(workdir / "wandb")  # the offline run, for `wandb sync`
  assert time.monotonic() - t0 < 90


def test_wandb_init_failure_keeps_metrics_jsonl(tmp_path, monkeypatch, caplog):
  import wandb

  def fail(**kwargs):
    raise RuntimeError("wandb is down")

  monkeypatch.setattr(wandb, "init", fail)
  cfg = base.get_config()
  cfg.wandb.mode = "online"
  writer = metrics_lib.MetricWriter(str(tmp_path), cfg, enabled=True)
  writer.write(1, {"loss": 2.5})
  writer.close()
  assert writer.wandb is None
  assert "wandb.init(mode='offline') failed (RuntimeError: wandb is down)" in caplog.text
  assert read_metrics(tmp_path) == [{"step": 1, "kind": "train", "loss": 2.5}]


def test_wandb_log_failure_turns_wandb_off(tmp_path):
  class Failing:
    def log(self, *args, **kwargs):
      raise ConnectionError("gone")

  cfg = base.get_config()
  cfg.wandb.mode = "disabled"
  writer = metrics_lib.MetricWriter(str(tmp_path), cfg, enabled=True)
  writer.wandb = Failing()
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.0})
  assert writer.wandb is None
  assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_truncate_keeps_the_records_up_to_the_checkpoint(tmp_path):
  cfg = base.get_config()
  cfg.wandb.mode = "disabled"
  writer = metrics_lib.MetricWriter(str(tmp_path), cfg, enabled=True)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.write(4, {"nll": 1.0}, kind="valid")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "kind": "tr')  # a kill in the middle of a line
  writer.truncate(3)
  assert [(m["step"], m["kind"]) for m in read_metrics(tmp_path)] == [(1, "train"), (2, "train"),
                                                                       (3, "train")]
  writer.write(4, {"loss": 4.0})
  writer.write(4, {"nll": 1.0}, kind="valid", replace=True)
  writer.write(4, {"nll": 0.5}, kind="valid", replace=True)  # the final eval of a re-run
  assert [(m["step"], m["kind"]) for m in read_metrics(tmp_path)] == [
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "valid")]
  assert read_metrics(tmp_path)[-1]["nll"] == 0.5


def test_wandb_offline_is_quiet_and_writes_its_files(tmp_path, capfd):
  cfg = base.get_config()
  cfg.wandb.mode = "offline"
  writer = metrics_lib.MetricWriter(str(tmp_path), cfg, enabled=True)
  writer.write(1, {"loss": 2.5})
  writer.close()
  out, err = capfd.readouterr()
  assert "wandb" not in (out + err).lower(), out + err
  assert [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]


def test_truncate_drops_steps_that_two_runs_both_logged(tmp_path):
  cfg = base.get_config()
  cfg.wandb.mode = "disabled"
  writer = metrics_lib.MetricWriter(str(tmp_path), cfg, enabled=True)
  for step in (1, 1, 2, 2, 3):  # two launches into one workdir, before the lock
    writer.write(step, {"loss": float(step)})
  writer.write(2, {"nll": 1.0}, kind="valid")
  writer.truncate(2)
  assert [(m["step"], m["kind"]) for m in read_metrics(tmp_path)] == [
      (1, "train"), (2, "train"), (2, "valid")]


def test_error_log_takes_the_tracebacks_of_native_callbacks(tmp_path, capfd):
  """A tensorstore future that completes after orbax closed its event loop reports
  "Event loop is closed" through sys.unraisablehook (dozens of tracebacks on a failed restore or
  write, from any thread); checkpoint.ErrorLog sends them to its file."""
  import asyncio
  import threading

  import tensorstore as ts

  from research.train import checkpoint

  def orphaned_future(in_thread: bool) -> None:
    promise, future = ts.Promise.new()
    loop = asyncio.new_event_loop()

    async def wait():
      return await future

    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    if in_thread:
      setter = threading.Thread(target=promise.set_result, args=(1,))
      setter.start()
      setter.join()
    else:
      promise.set_result(1)
    del task

  with checkpoint.ErrorLog(str(tmp_path / "errors.log")) as log:
    orphaned_future(in_thread=True)
    orphaned_future(in_thread=False)
  assert log.count == 2
  assert (tmp_path / "errors.log").read_text().count("RuntimeError: Event loop is closed") == 2
  assert "Event loop is closed" not in capfd.readouterr().err


def test_error_log_takes_an_orphaned_orbax_read_task(tmp_path, capfd):
  """A failed orbax read task that nobody awaited is reported by asyncio when it is collected,
  after its checkpoint was already skipped ("Task exception was never retrieved", seen under
  load in the corrupted-checkpoint test): it goes to the error log, not to the console."""
  import asyncio
  import gc
  import logging as pylogging

  from absl import logging as absl_logging

  from research.train import checkpoint

  source = ("async def read():\n"
            "  raise ValueError('Encountered error while reading array index')\n")
  namespace = {}  # a coroutine whose code lives in orbax, as the task's repr then says
  exec(compile(source, os.path.join(os.sep, "site-packages", "orbax", "serialization.py"),
               "exec"), namespace)

  handler = absl_logging.get_absl_handler()  # on the root logger, as app.run puts it
  pylogging.getLogger().addHandler(handler)
  try:
    with checkpoint.ErrorLog(str(tmp_path / "errors.log")) as log:
      loop = asyncio.new_event_loop()
      task = loop.create_task(namespace["read"]())
      loop.run_until_complete(asyncio.sleep(0.01))
      loop.close()
      del task
      gc.collect()
  finally:
    pylogging.getLogger().removeHandler(handler)
  assert log.count == 1, capfd.readouterr().err
  assert "Task exception was never retrieved" in (tmp_path / "errors.log").read_text()
  assert "Traceback" not in capfd.readouterr().err
