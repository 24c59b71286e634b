"""Runs launch.py in subprocesses with tiny shapes, for tests that need a real process.

  launcher = Launcher(tmp_path_factory.mktemp("shared"))  # once per session
  result = launcher.run(tmp_path / "run", {"train.steps": 20})
  assert result.returncode == 0, result.stderr
  losses = train_losses(result.metrics)

Every run shares the BPE cache and a JAX persistent compilation cache under the shared directory,
so the tokenizer is trained once and each distinct step function compiles once per session.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model that compiles in seconds and steps in milliseconds on a 2-core CPU.
TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.d_ff": 64, "data.seq_len": 32, "data.bpe_vocab_size": 512, "train.batch_size": 4,
    "train.eval_batches": 2, "train.eval_every": 0, "train.log_every": 1,
    "train.progress": False, "wandb.mode": "disabled",
}


@dataclasses.dataclass
class Result:
  """A finished launch.py process and the records of its workdir's metrics.jsonl."""

  returncode: int
  stdout: str
  stderr: str
  metrics: list[dict]


class Launcher:
  """Builds launch.py command lines with TINY overrides and shared caches under `shared_dir`."""

  def __init__(self, shared_dir: str | os.PathLike, config: str = "configs/vanilla.py:tiny"):
    self.shared_dir = os.fspath(shared_dir)
    self.config = config

  def command(self, workdir: str | os.PathLike, overrides: dict | None = None, *,
              config: str | None = None) -> list[str]:
    """The launch.py command line (`config`: another --config than the launcher's)."""
    flags = dict(TINY, **{"data.cache_dir": os.path.join(self.shared_dir, "data")})
    flags.update(overrides or {})
    return [sys.executable, os.path.join(REPO, "launch.py"), f"--config={config or self.config}",
            f"--workdir={os.fspath(workdir)}", *(f"--config.{k}={v}" for k, v in flags.items())]

  def env(self, extra: dict | None = None) -> dict[str, str]:
    """os.environ for one CPU device, the shared compilation cache, and `extra` (None: unset)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(self.shared_dir, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever the calling test set up
    for key, value in (extra or {}).items():
      if value is None:
        env.pop(key, None)
      else:
        env[key] = value
    return env

  def run(self, workdir: str | os.PathLike, overrides: dict | None = None, *,
          env: dict | None = None, timeout: float = 300, config: str | None = None) -> Result:
    """Runs to completion and returns the exit status, output and metrics."""
    p = subprocess.run(self.command(workdir, overrides, config=config), cwd=REPO,
                       env=self.env(env),
                       capture_output=True, text=True, timeout=timeout, check=False)
    return Result(p.returncode, p.stdout, p.stderr, read_metrics(workdir))

  def start(self, workdir: str | os.PathLike, overrides: dict | None = None, *,
            env: dict | None = None) -> subprocess.Popen:
    """Starts a run in the background (output in <workdir>.out / <workdir>.err)."""
    workdir = os.fspath(workdir)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    with open(f"{workdir}.out", "w") as out, open(f"{workdir}.err", "w") as err:
      return subprocess.Popen(self.command(workdir, overrides), cwd=REPO, env=self.env(env),
                              stdout=out, stderr=err)


def finish(proc: subprocess.Popen, workdir: str | os.PathLike, timeout: float = 300) -> Result:
  """Waits for a process from Launcher.start and collects it like Launcher.run."""
  workdir = os.fspath(workdir)
  proc.wait(timeout=timeout)
  with open(f"{workdir}.out") as out, open(f"{workdir}.err") as err:
    return Result(proc.returncode, out.read(), err.read(), read_metrics(workdir))


def wait_for_step(proc: subprocess.Popen, workdir: str | os.PathLike, step: int,
                  timeout: float = 120) -> int:
  """Polls metrics.jsonl until a train record with step >= `step` appears; returns that step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [r["step"] for r in read_metrics(workdir) if r["kind"] == "train"]
    if steps and max(steps) >= step:
      return max(steps)
    if proc.poll() is not None:
      raise AssertionError(f"the run exited with {proc.returncode} before step {step}")
    time.sleep(0.005)
  raise AssertionError(f"no step {step} within {timeout}s")


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The complete records of <workdir>/metrics.jsonl (a half-written last line is ignored)."""
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  return [json.loads(line) for line in lines[:-1] if line]


def train_losses(metrics: list[dict]) -> dict[int, float]:
  """step -> loss of the train records; asserts that no step is logged twice."""
  steps = [r["step"] for r in metrics if r["kind"] == "train"]
  assert len(steps) == len(set(steps)), f"steps logged more than once: {sorted(steps)}"
  return {r["step"]: r["loss"] for r in metrics if r["kind"] == "train"}


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Finalized checkpoint steps in <workdir>/checkpoints."""
  root = os.path.join(os.fspath(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
