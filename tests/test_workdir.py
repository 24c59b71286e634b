"""The workdir lock and checks of research/train/workdir.py (issue 15 items 2 and 7), in-process;
tests/test_reliability.py checks them on real launch.py processes."""

import builtins
import json
import os
import socket
import subprocess
import sys

import pytest

from research.config import ConfigError
from research.train import workdir


def write_lock(path, pid, host=None):
  (path / "lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                         "since": 0}))


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_the_lock_is_exclusive_and_released(tmp_path):
  with workdir.WorkdirLock(str(tmp_path)):
    holder = json.loads((tmp_path / "lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"in use by process {os.getpid()} on host "):
      workdir.WorkdirLock(str(tmp_path)).__enter__()
  assert not (tmp_path / "lock").exists()


def test_a_live_holder_is_refused_a_dead_one_taken_over(tmp_path, caplog):
  write_lock(tmp_path, os.getppid())  # alive
  with pytest.raises(ConfigError, match=rf"--workdir={tmp_path}: in use by process "
                     rf"{os.getppid()} on host {socket.gethostname()} since 1970-01-0"):
    workdir.WorkdirLock(str(tmp_path)).__enter__()
  pid = dead_pid()
  write_lock(tmp_path, pid)
  with workdir.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  assert f"took over the lock {tmp_path / 'lock'} of process {pid}" in caplog.text
  write_lock(tmp_path, pid, host="elsewhere")  # cannot be checked from here
  with pytest.raises(ConfigError, match="if that run is gone, delete the lock file"):
    workdir.WorkdirLock(str(tmp_path)).__enter__()


def test_a_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=r"--workdir=.*/file: is a file, not a directory"):
    workdir.prepare(str(tmp_path / "file"))
  real_open = builtins.open

  def read_only(path, mode="r", *args, **kwargs):
    if "w" in mode:
      raise PermissionError(13, "Read-only file system", path)
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", read_only)  # root ignores chmod, so simulate it
  with pytest.raises(ConfigError, match=r"--workdir=.*/ro: cannot be written \(Read-only file "
                     r"system\)"):
    workdir.prepare(str(tmp_path / "ro"))
