"""Two processes on localhost through jax.distributed, each with 2 CPU devices, run launch.py into
one workdir: fsdp spans the processes, tensor parallelism stays inside each.

Each process reads its own shard of the documents (research/data), so the 2-process global batch
is the two per-process batches stacked. The reference is one process that stacks the same two
streams (this file is its worker: `python tests/test_distributed.py '<json job>'`).
"""

import json
import os
import socket
import sys
from pathlib import Path
from unittest import mock

import ml_collections as mlc
import numpy as np
import pytest

from research.train import mesh as mesh_lib
from tests import launch_util

REPO = Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES = 2, 2
FIRST, TOTAL = 4, 6  # the first launch trains to FIRST, the second resumes to TOTAL
TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 64, "data.seq_len": 32, "train.batch_size": 8, "data.bpe_vocab_size": 512,
    "data.shuffle_window": 64,
    "train.eval_batches": 2, "wandb.mode": "disabled", "train.progress": False,
    "train.log_every": 1, "train.schedule": "constant", "train.warmup_steps": 0,
    "checkpoint.every": 2,
}
MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
# float32; the processes reduce in another order. Observed: losses within 1.5e-6 of the 1-process
# run (rel 2.3e-7), validation NLL identical.
TOL = dict(rtol=1e-5, atol=1e-6)
TIMEOUT = 240  # seconds per subprocess; a stuck collective fails the test instead of hanging CI


def env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS=launch_util.xla_flags(devices))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two_processes(workdir: Path, overrides: dict, config: str = "configs/vanilla.py:tiny"
                         ) -> list[str]:
  """Runs launch.py as processes 0 and 1 of one jax.distributed job; returns their stdouts."""
  port = free_port()
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  logs = [(f"{workdir}.{i}.out", f"{workdir}.{i}.err") for i in range(PROCESSES)]
  procs = [launch_util.python_popen(
      ["launch.py", f"--config={config}", f"--workdir={workdir}",
       *flags, "--config.distributed.enabled=yes",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       f"--config.distributed.num_processes={PROCESSES}", f"--config.distributed.process_id={i}"],
      env=env(LOCAL_DEVICES), stdout=out, stderr=err) for i, (out, err) in enumerate(logs)]
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [(Path(out).read_text(), Path(err).read_text()) for out, err in logs]
  for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
  return [out for out, _ in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  tmp = tmp_path_factory.mktemp("distributed")
  overrides = dict(TINY, **{"data.cache_dir": str(tmp / "cache")})
  # The reference goes first: it trains the BPE tokenizer the launches reuse.
  job = {"overrides": overrides, "workdir": str(tmp / "reference"), "steps": TOTAL,
         "eval_at": [FIRST, TOTAL]}
  proc = launch_util.python_run([__file__, json.dumps(job)], env=env(1), timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = json.loads(proc.stdout.strip().splitlines()[-1])
  workdir = tmp / "run"
  first = launch_two_processes(workdir, dict(overrides, **MESH, **{"train.steps": FIRST}))
  second = launch_two_processes(workdir, dict(overrides, **MESH, **{"train.steps": TOTAL}))
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return {"reference": reference, "stdouts": first + second, "records": records,
          "workdir": workdir}


def test_losses_match_one_process_with_the_same_global_batch(runs):
  train = [r for r in runs["records"] if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, TOTAL + 1))  # resumed at FIRST + 1
  np.testing.assert_allclose([r["loss"] for r in train], runs["reference"]["losses"], **TOL)
  valid = {r["step"]: r["nll"] for r in runs["records"] if r["kind"] == "valid"}
  assert sorted(valid) == [FIRST, TOTAL]
  np.testing.assert_allclose([valid[FIRST], valid[TOTAL]], runs["reference"]["valid_nll"], **TOL)


def test_only_process_zero_reports(runs):
  # metrics.jsonl holds each step once (asserted above); only process 0 prints the result.
  main, other = runs["stdouts"][0::2], runs["stdouts"][1::2]
  assert all("validation nll" in out for out in main), main
  assert not any("validation nll" in out for out in other), other


def test_one_checkpoint_per_step_with_every_process_data_state(runs):
  ckpt = runs["workdir"] / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps == [2, 4, 6]
  assert not [p.name for p in ckpt.iterdir() if "tmp" in p.name]  # every save was committed
  for step in steps:
    data = sorted(p.name for p in (ckpt / str(step) / "data").glob("process_*.json"))
    assert data == [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
    assert (ckpt / str(step) / "state" / "_METADATA").is_file()


# --- expert parallelism across the processes ---------------------------------------------------


EP_STEPS = 3
EP_MESH = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.expert": 4, "mesh.tensor": 1}
EP_MOE = {"model.moe.d_ff": 16, "train.steps": EP_STEPS, "checkpoint.every": 0}


def test_expert_axis_across_processes_matches_one_process(tmp_path):
  """configs/moe.py:tiny (8 experts, top-2) with mesh.expert=4 over 2 processes x 2 devices:
  each process owns 4 experts, the all-to-alls cross the processes; the losses equal one process
  on one device with the same global batches."""
  overrides = dict(TINY, **EP_MOE, **{"data.cache_dir": str(tmp_path / "cache")})
  job = {"overrides": overrides, "workdir": str(tmp_path / "reference"), "steps": EP_STEPS,
         "eval_at": [EP_STEPS], "config": "moe"}
  proc = launch_util.python_run([__file__, json.dumps(job)], env=env(1), timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = json.loads(proc.stdout.strip().splitlines()[-1])
  workdir = tmp_path / "run"
  launch_two_processes(workdir, dict(overrides, **EP_MESH), config="configs/moe.py:tiny")
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, EP_STEPS + 1))
  assert all("moe/load" in r for r in train)
  np.testing.assert_allclose([r["loss"] for r in train], reference["losses"], **TOL)
  valid = [r["nll"] for r in records if r["kind"] == "valid"]
  np.testing.assert_allclose(valid, reference["valid_nll"], **TOL)


# --- start-up (in-process, nothing is initialised) ----------------------------------------------


CLUSTER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.mark.parametrize("env_vars, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, True),
])
def test_cluster_detection(monkeypatch, env_vars, expected):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  for name, value in env_vars.items():
    monkeypatch.setenv(name, value)
  assert mesh_lib.cluster_detected() is expected


@pytest.mark.parametrize("enabled, address, slurm, expected", [
    ("no", "127.0.0.1:1234", "4", None),
    ("auto", "", "1", None),
    ("auto", "", "4", {}),  # JAX reads the SLURM environment itself
    ("auto", "10.0.0.1:1234", "1", {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                    "process_id": 1}),
    ("yes", "", "1", {}),
])
def test_initialize_arguments(monkeypatch, enabled, address, slurm, expected):
  calls = []
  monkeypatch.setattr(mesh_lib.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(mesh_lib.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", slurm)
  explicit = bool(address)
  cfg = mlc.ConfigDict({"enabled": enabled, "coordinator_address": address,
                        "num_processes": 2 if explicit else -1,
                        "process_id": 1 if explicit else -1})
  mesh_lib.maybe_initialize_distributed(cfg)
  assert calls == ([] if expected is None else [expected])


# --- reference worker ---------------------------------------------------------------------------


def stacked_iterator(loop, run, docs, *, train: bool):
  """The global batches of a PROCESSES-process run: each process's batch, stacked in order."""
  iters = []
  for i in range(PROCESSES):
    with mock.patch("jax.process_index", return_value=i), \
         mock.patch("jax.process_count", return_value=PROCESSES):
      iters.append(loop.make_iterator(run, docs, train=train))
  while True:
    parts = [next(it) for it in iters]
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reference(job: dict) -> dict:
  """One process, one device: losses and validation NLL of the stacked global batches."""
  import importlib

  from research.train import checkpoint, loop
  from research.train import mesh as mesh_lib

  cfg = importlib.import_module(f"configs.{job.get('config', 'vanilla')}").get_config("tiny")
  cfg.update_from_flattened_dict(job["overrides"])
  run = loop.setup(cfg, job["workdir"])
  mngr = checkpoint.make_manager(os.path.join(job["workdir"], "checkpoints"), keep=1,
                                 async_save=False)
  state, _, _ = loop.restore_or_init(run, mngr)
  mngr.close()
  train_step, eval_step = loop.compile_steps(run)
  train_batches = stacked_iterator(loop, run, run.train_docs, train=True)
  losses, valid_nll = [], []
  for step in range(1, job["steps"] + 1):
    state, metrics = train_step(state, mesh_lib.host_to_global(next(train_batches), run.mesh))
    losses.append(float(metrics["loss"]))
    if step in job["eval_at"]:
      valid_batches = stacked_iterator(loop, run, run.valid_docs, train=False)
      sums = [eval_step(state, mesh_lib.host_to_global(next(valid_batches), run.mesh))
              for _ in range(run.cfg.train.eval_batches)]
      valid_nll.append(sum(float(t["nll"]) for t, _ in sums) / sum(float(c) for _, c in sums))
  return {"losses": losses, "valid_nll": valid_nll}


if __name__ == "__main__":
  print(json.dumps(reference(json.loads(sys.argv[1]))))
