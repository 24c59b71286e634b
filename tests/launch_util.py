"""Runs launch.py in subprocesses with tiny shapes, for tests that need a real process.

  launcher = Launcher(tmp_path_factory.mktemp("shared"))  # once per session
  result = launcher.run(tmp_path / "run", {"train.steps": 20})
  assert result.returncode == 0, result.stderr
  losses = train_losses(result.metrics)

Every run shares the BPE cache and a JAX persistent compilation cache under the shared directory,
so the tokenizer is trained once and each distinct step function compiles once per session.
The processes are forked from a server with launch.py's imports done (python_popen, python_run;
LAUNCH_UTIL_NO_FORK=1: plain subprocesses), which saves ~3.5 s of each one's start-up.
"""

import atexit
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU backend at LLVM -O0 for the tests (conftest.py sets it in-process; launched processes
# get it here): compiles 1.5x faster, which is most of the suite's time, at the cost of slower
# kernels and results that differ from -O2 in the last bits. The README's command
# (test_train_e2e) and the notebooks run without it, as a user runs them.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_test_xla_flags(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) with TEST_XLA_FLAGS appended, once."""
  return flags if TEST_XLA_FLAGS in flags.split() else f"{flags} {TEST_XLA_FLAGS}".strip()


def user_env() -> dict[str, str]:
  """os.environ without TEST_XLA_FLAGS: what a user's process would see."""
  env = dict(os.environ)
  flags = [f for f in env.pop("XLA_FLAGS", "").split() if f != TEST_XLA_FLAGS]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: TEST_XLA_FLAGS, on `devices` simulated CPU devices."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
  return TEST_XLA_FLAGS + count

# A model that compiles in seconds and steps in milliseconds on a 2-core CPU.
TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.d_ff": 64, "data.seq_len": 32, "data.bpe_vocab_size": 512, "train.batch_size": 4,
    "data.shuffle_window": 64,
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
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=xla_flags())  # one CPU device, whatever the calling test set up
    for key, value in (extra or {}).items():
      if value is None:
        env.pop(key, None)
      else:
        env[key] = value
    return env

  def run(self, workdir: str | os.PathLike, overrides: dict | None = None, *,
          env: dict | None = None, timeout: float = 300, config: str | None = None) -> Result:
    """Runs to completion and returns the exit status, output and metrics."""
    p = python_run(self.command(workdir, overrides, config=config)[1:], env=self.env(env),
                   timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr, read_metrics(workdir))

  def start(self, workdir: str | os.PathLike, overrides: dict | None = None, *,
            env: dict | None = None) -> "subprocess.Popen | ForkedProcess":
    """Starts a run in the background (output in <workdir>.out / <workdir>.err)."""
    workdir = os.fspath(workdir)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    return python_popen(self.command(workdir, overrides)[1:], env=self.env(env),
                        stdout=f"{workdir}.out", stderr=f"{workdir}.err")


def finish(proc: "subprocess.Popen | ForkedProcess", workdir: str | os.PathLike,
           timeout: float = 300) -> Result:
  """Waits for a process from Launcher.start and collects it like Launcher.run."""
  workdir = os.fspath(workdir)
  proc.wait(timeout=timeout)
  with open(f"{workdir}.out") as out, open(f"{workdir}.err") as err:
    return Result(proc.returncode, out.read(), err.read(), read_metrics(workdir))


def wait_for_step(proc: "subprocess.Popen | ForkedProcess", workdir: str | os.PathLike, step: int,
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


# --- processes: forked from a warm server, or plain subprocesses ------------------------------
#
# A `python launch.py` child spends ~4 s importing jax, flax, orbax and grain. A fork server (one
# per distinct environment, started on first use) imports launch.py's modules once, without
# initialising a JAX backend (the only thread the imports start is pyarrow's jemalloc background
# thread, which jemalloc's fork handlers cover), and forks one child per run: the child sets argv,
# env, cwd and stdio, then runs the script with runpy as `python script ...` would, so the exit
# status (SystemExit, an uncaught exception, a signal) is the interpreter's own. The server's
# environment is the run's (but for VOLATILE variables, set in the child), so whatever modules
# read from it at import time (jax's config flags) is the same. The child is a child of the
# server, not of the test: ForkedProcess gets its exit status from the server and signals it by
# pid. Differences from a fresh interpreter: the hash seed is the server's (the same in every
# child) and no import-time warning reaches the child's stderr.
#
# LAUNCH_UTIL_NO_FORK=1 runs every command as a plain subprocess, to compare the two.

NO_FORK = os.environ.get("LAUNCH_UTIL_NO_FORK", "") not in ("", "0")
# Set in the child, but no reason for a server of its own: pytest's name of the running test.
VOLATILE = ("PYTEST_CURRENT_TEST",)
MAX_SERVERS = 4  # servers alive at once per test process (each holds ~0.3 GB of imports)


def python_popen(args: list[str], *, env: dict[str, str], stdout: str, stderr: str,
                 cwd: str = REPO) -> "subprocess.Popen | ForkedProcess":
  """Starts `python script.py ...` (`args` without sys.executable), its stdout and stderr written
  to the files `stdout` and `stderr` (the same path: interleaved, like stderr=STDOUT)."""
  if NO_FORK or not args[0].endswith(".py"):
    with open(stdout, "w") as out:
      err = open(stderr, "w") if stderr != stdout else None
      with err or out:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err or subprocess.STDOUT)
  return _server(env).spawn(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr)


def python_run(args: list[str], *, env: dict[str, str], timeout: float,
               cwd: str = REPO) -> subprocess.CompletedProcess:
  """subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
  through python_popen: kills the process and raises TimeoutExpired after `timeout` seconds."""
  with tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    proc = python_popen(args, env=env, stdout=out, stderr=err, cwd=cwd)
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      raise
    with open(out) as o, open(err) as e:
      return subprocess.CompletedProcess(args, proc.returncode, o.read(), e.read())


class ForkedProcess:
  """The Popen methods the tests use, for a child of a fork server."""

  def __init__(self, pid: int):
    self.pid, self.args, self.returncode = pid, None, None
    self._done, self._lost = threading.Event(), False

  def _exited(self, code: int | None) -> None:  # the server's reader thread
    self.returncode, self._lost = code, code is None
    self._done.set()

  def poll(self) -> int | None:
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    if not self._done.wait(timeout):
      raise subprocess.TimeoutExpired(self.args, timeout)
    if self._lost:
      raise RuntimeError(f"the fork server of pid {self.pid} died; its exit status is lost")
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.returncode is None:
      with contextlib.suppress(ProcessLookupError):  # exited, not reported yet (like Popen)
        os.kill(self.pid, sig)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


class _Server:
  """A `python -m tests.launch_util --serve` process and a thread that reads its replies."""

  def __init__(self, env: dict[str, str]):
    self._log = tempfile.TemporaryFile()  # the server's own stderr (an import error)
    self._proc = subprocess.Popen([sys.executable, "-m", "tests.launch_util", "--serve"],
                                  cwd=REPO, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._log)
    self._lock = threading.Lock()  # one request at a time
    self._started: queue.Queue[ForkedProcess | None] = queue.Queue()
    self._children: dict[int, ForkedProcess] = {}
    if self._proc.stdout.readline() != b"ready\n":
      self._proc.wait()
      self._log.seek(0)
      raise RuntimeError(f"the fork server failed to start:\n{self._log.read().decode()}")
    threading.Thread(target=self._read, daemon=True).start()

  def spawn(self, args: list[str], *, env: dict[str, str], cwd: str, stdout: str,
            stderr: str) -> ForkedProcess:
    request = {"argv": args, "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
    with self._lock:
      self._proc.stdin.write(json.dumps(request).encode() + b"\n")
      self._proc.stdin.flush()
      child = self._started.get(timeout=60)
    if child is None:
      raise RuntimeError("the fork server died")
    child.args = [sys.executable, *args]
    return child

  def _read(self) -> None:
    for line in self._proc.stdout:
      message = json.loads(line)
      if "pid" in message:  # registered here, before its exit can be read
        self._children[message["pid"]] = child = ForkedProcess(message["pid"])
        self._started.put(child)
      else:
        self._children.pop(message["exit"])._exited(message["code"])
    for child in self._children.values():
      child._exited(None)
    self._started.put(None)

  def close(self, timeout: float | None = None) -> None:
    """No more requests: the server exits once its running children have."""
    with contextlib.suppress(OSError):
      self._proc.stdin.close()
    if timeout is not None:
      try:
        self._proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self._proc.kill()


_servers: dict[tuple, _Server] = {}  # by environment, least recently used first
_servers_lock = threading.Lock()


def _server(env: dict[str, str]) -> _Server:
  key = tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE))
  with _servers_lock:
    server = _servers.pop(key, None) or _Server(env)
    _servers[key] = server
    while len(_servers) > MAX_SERVERS:
      _servers.pop(next(iter(_servers))).close()
    return server


@atexit.register
def _close_servers() -> None:
  for server in _servers.values():
    server.close(timeout=10)


def _serve() -> dict:
  """The server's loop: forks a child per request line on stdin and writes `{"pid": n}` and,
  once the child has exited, `{"exit": n, "code": returncode}` to stdout. Returns the request in
  the child; exits once stdin is closed and every child has exited."""
  import ast
  import importlib
  import select

  with open(os.path.join(REPO, "launch.py")) as f:  # launch.py's imports: the ~4 s to save
    for node in ast.parse(f.read()).body:
      if isinstance(node, ast.Import | ast.ImportFrom):
        for alias in node.names:
          module = f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
          with contextlib.suppress(ImportError):  # `from x import function`
            importlib.import_module(module)
  from jax._src import xla_bridge
  assert not getattr(xla_bridge, "_backends", None), "an import initialised a JAX backend"
  os.write(1, b"ready\n")
  children: dict[int, int] = {}  # pidfd -> pid
  pending, reading = b"", True
  while reading or children:
    ready, _, _ = select.select([0] * reading + list(children), [], [])
    for fd in ready:
      if fd != 0:
        pid = children.pop(fd)
        os.close(fd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.write(1, json.dumps({"exit": pid, "code": code}).encode() + b"\n")
    if 0 in ready:
      data = os.read(0, 1 << 16)
      reading, pending = bool(data), pending + data
      while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        pid = os.fork()
        if pid == 0:
          for fd in children:
            os.close(fd)
          return json.loads(line)
        children[os.pidfd_open(pid)] = pid
        os.write(1, json.dumps({"pid": pid}).encode() + b"\n")
  sys.exit(0)


def _exec(request: dict) -> None:
  """In a forked child: become `python <argv>` with the requested cwd and stdio, and run it."""
  import runpy

  flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
  out = os.open(request["stdout"], flags)
  err = out if request["stderr"] == request["stdout"] else os.open(request["stderr"], flags)
  null = os.open(os.devnull, os.O_RDONLY)
  for fd, target in ((null, 0), (out, 1), (err, 2)):
    os.dup2(fd, target)
  for fd in {null, out, err}:
    os.close(fd)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator from the OS
    sys.modules["numpy"].random.seed()
  script = request["argv"][0]
  sys.argv = list(request["argv"])
  sys.path[0] = os.path.dirname(os.path.abspath(script))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
  _exec(_serve())
