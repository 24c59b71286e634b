"""The workdir of a training run: created and checked writable, then locked against a second run.

The lock is the file <workdir>/lock holding the holder's process id and host name, created with
O_EXCL before anything else in the workdir is touched (caches, config.json, the clean-up of
unfinished checkpoint writes). A second launch into the same workdir fails with one line naming the
holder. A lock left by a process that no longer runs on this host (SIGKILL, a second signal) is
taken over with a warning; a lock held from another host cannot be checked from here and is
refused (delete the file once that run is surely gone).
"""

import errno
import json
import os
import socket
import time

from absl import logging

from research.config import ConfigError

LOCK = "lock"


def prepare(workdir: str) -> None:
  """Creates `workdir` if needed; ConfigError if it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot be written ({e.strerror or e})") from None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read_holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # being written, or garbage: treated as held by an unknown process


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds <workdir>/lock; ConfigError if another run holds it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    for _ in range(10):  # a few rounds: another launch may take over a stale lock at once
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      except OSError as e:
        raise ConfigError(f"--workdir={os.path.dirname(self.path)}: cannot create the lock "
                          f"{self.path} ({e.strerror or e})") from None
      with os.fdopen(fd, "w") as f:
        json.dump(self.me, f)
      self.held = True
      return self
    raise ConfigError(f"--workdir={os.path.dirname(self.path)}: could not take the lock "
                      f"{self.path} (other launches keep taking it)")

  def _take_over_if_stale(self) -> None:
    holder = _read_holder(self.path)
    if holder is None:  # released meanwhile
      return
    pid, host = holder.get("pid"), holder.get("host")
    workdir = os.path.dirname(self.path)
    if not isinstance(pid, int) or host != self.me["host"] or _alive(pid):
      since = holder.get("since")
      when = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
              if isinstance(since, (int, float)) else "")
      raise ConfigError(
          f"--workdir={workdir}: in use by process {pid} on host {host}{when} (lock file "
          f"{self.path}); wait for it to finish, stop it, or use another --workdir"
          + ("" if host == self.me["host"] else "; if that run is gone, delete the lock file"))
    stale = f"{self.path}.stale-{pid}-{os.getpid()}"
    try:
      os.rename(self.path, stale)  # atomic: of two launches taking over, one wins
    except FileNotFoundError:
      return
    os.remove(stale)
    logging.warning("took over the lock %s of process %d on %s, which no longer runs",
                    self.path, pid, host)

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    """Removes the lock file if this process still holds it."""
    if not self.held:
      return
    self.held = False
    holder = _read_holder(self.path)
    if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
      try:
        os.remove(self.path)
      except OSError as e:
        if e.errno != errno.ENOENT:
          logging.warning("could not remove the lock %s: %s", self.path, e)
