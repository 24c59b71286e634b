"""Checkpoints: one orbax CheckpointManager per run under <workdir>/checkpoints.

Items of a step: `state` (params, other model variables, optimizer state, step), `data` (the grain
iterator state, one file per process) and `meta` (JSON: step, config, tokenizer facts, a checksum
of the state). Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a step killed mid-write is never listed; leftover temporary directories are deleted
when the manager starts. A listed step that fails to load (truncated, corrupted or missing files,
a state whose checksum differs from the recorded one, non-finite values) is skipped with a warning
naming it and moved aside, and the next older one is tried. A state holding NaN or Inf is never
written.
"""

import errno
import logging as pylogging
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from research.config import ConfigError

ITEMS = ("state", "data", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N here, then renames it to N


class NonFiniteStateError(RuntimeError):
  """The state to checkpoint holds NaN or Inf; it is not written."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (e.g. a full disk); the message is one line."""


def _os_error(e: BaseException) -> OSError | None:
  """The first OSError in the chain of `e` (itself, its cause or context), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      return e
    e = e.__cause__ or e.__context__
  return None


def write_error(mngr: ocp.CheckpointManager, step: int, e: BaseException) -> CheckpointWriteError:
  """A one-line CheckpointWriteError for the failed save of `step`, naming its path."""
  path = os.path.join(str(mngr.directory), str(step))
  os_error = _os_error(e)
  if (os_error is not None and os_error.errno == errno.ENOSPC) or "No space left" in str(e):
    why = "no space left on device"
  elif os_error is not None:
    why = f"{os_error.strerror or os_error}".lower()
  else:
    why = _describe(e)
  done = [s for s in mngr.all_steps() if s != step]
  kept = (f"the complete checkpoints (newest: step {max(done)}) are intact" if done
          else "no earlier checkpoint exists")
  return CheckpointWriteError(f"{path}: the checkpoint of step {step} could not be written: "
                              f"{why}; {kept}")


def confirm(mngr: ocp.CheckpointManager, step: int, *, wait: bool) -> bool:
  """Whether the save of `step` has finished (`wait`: wait for it); raises CheckpointWriteError if
  it failed. An asynchronous write's error surfaces here, at the first step after it."""
  try:
    if wait:
      mngr.wait_until_finished()
    elif mngr.is_saving_in_progress():
      return False
    mngr.check_for_errors()
  except Exception as e:
    raise write_error(mngr, step, e) from e
  return True


class ErrorLog:
  """`with ErrorLog(path):` sends orbax's tracebacks (a failed write or restore logs hundreds of
  lines) and those of exceptions raised in background threads to the file `path`, created when
  the first one arrives; the console keeps the one-line messages. `write(text)` appends there."""

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self.unwritable = False
    self._filter = _OrbaxTracebackFilter(self)

  def write(self, text: str) -> None:
    self.count += 1
    try:
      with open(self.path, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text.rstrip()}\n")
    except OSError as e:  # e.g. the full disk that made the checkpoint fail
      if not self.unwritable:  # once
        os.write(2, f"warning: could not write a traceback to {self.path} ({e})\n".encode())
      self.unwritable = True

  def __enter__(self) -> "ErrorLog":
    self._handler = logging.get_absl_handler()
    self._handler.addFilter(self._filter)
    self._hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
    # Native callbacks (tensorstore futures completing after orbax closed their event loop)
    # report their exceptions through these hooks. While the log is active, no exception reaches
    # sys.excepthook uncaught: the `with` block is left before the interpreter reports one.
    sys.excepthook = lambda kind, value, tb: self._write_exception(kind, value, tb)
    threading.excepthook = lambda a: self._write_exception(a.exc_type, a.exc_value,
                                                           a.exc_traceback)
    sys.unraisablehook = lambda u: self._write_exception(
        u.exc_type, u.exc_value, u.exc_traceback, f"{u.err_msg or 'Exception ignored in'}: "
        f"{u.object!r}\n" if u.object is not None else "")
    return self

  def __exit__(self, *exc) -> None:
    self._handler.removeFilter(self._filter)
    sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks

  def _write_exception(self, kind, value, tb, header: str = "") -> None:
    self.write(header + "".join(traceback.format_exception(kind, value, tb)))


class _OrbaxTracebackFilter(pylogging.Filter):
  def __init__(self, log: ErrorLog):
    super().__init__()
    self.log = log

  def filter(self, record: pylogging.LogRecord) -> bool:
    orbax = f"{os.sep}orbax{os.sep}"
    # asyncio reports a failed orbax read task ("Task exception was never retrieved") when the
    # task is garbage-collected, after the restore that skipped its checkpoint
    orphan = record.name == "asyncio" and orbax in record.getMessage()
    if (record.exc_info or orphan) and (orbax in record.pathname or orphan):
      self.log.write(pylogging.Formatter().format(record))
      return False
    return True


def make_manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
  """The manager a training run writes with; first deletes the writes a kill left unfinished."""
  directory = os.path.abspath(directory)
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if TMP_SUFFIX in name:
        logging.warning("removing %s: a checkpoint write that did not finish",
                        os.path.join(directory, name))
        shutil.rmtree(os.path.join(directory, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoint: unfinished writes removed")
  return _manager(directory, ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save))


def open_manager(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads (eval mode, restore_from): it creates and deletes nothing."""
  return _manager(directory, ocp.CheckpointManagerOptions(create=False))


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  handlers = {"state": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS, options=options,
                               item_handlers=handlers)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Position-weighted sum (mod 2**32) of the bits of `x`; no reshape, so no resharding."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize >= 4:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    u = u.astype(jnp.uint32)
  index, stride = jnp.zeros(u.shape, jnp.uint32), 1
  for axis in reversed(range(u.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= u.shape[axis]
  return jnp.sum(u * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _summary(tree: Any) -> tuple[jax.Array, jax.Array]:
  finite, checksum = jnp.array(True), jnp.zeros((), jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite &= jnp.all(jnp.isfinite(x))
    checksum += _leaf_checksum(x) * jnp.uint32(2 * i + 1)
  return finite, checksum


def summary(tree: Any) -> tuple[bool, int]:
  """(every floating-point value is finite, a checksum of every bit) of `tree`."""
  finite, checksum = jax.device_get(_summary(tree))
  return bool(finite), int(checksum)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict) -> None:
  """Starts saving `step` (asynchronously if the manager is async); overwrites nothing.

  Raises NonFiniteStateError, writing nothing, if `state` holds NaN or Inf, and
  CheckpointWriteError if the write fails at once (`confirm` reports a background failure).
  """
  if step in mngr.all_steps():
    return
  finite, checksum = summary(state)
  if not finite:
    newest = mngr.latest_step()
    raise NonFiniteStateError(
        f"step {step}: the training state holds NaN or Inf, so it was not checkpointed (an "
        f"update overflowed, e.g. a too-large config.train.lr); the newest checkpoint is "
        f"{'none' if newest is None else os.path.join(str(mngr.directory), str(newest))}")
  try:
    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(dict(meta, state_checksum=checksum))))
  except Exception as e:  # the synchronous part of the write (all of it when not async)
    raise write_error(mngr, step, e) from e


def _restore(mngr: ocp.CheckpointManager, step: int, check_meta: Callable[[dict], None],
             abstract_state: Any, new_iter: Callable[[], Any]) -> tuple[Any, dict, Any]:
  """(state, meta, data iterator) of `step`; `check_meta` vets the meta before the state loads."""
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_meta(meta)
  _check_shapes(os.path.join(str(mngr.directory), str(step)), mngr.item_metadata(step)["state"],
                abstract_state)
  data_iter = new_iter()  # a fresh iterator: a failed restore leaves nothing half-set
  r = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  finite, checksum = summary(r["state"])
  if not finite:
    raise ValueError("the restored state holds NaN or Inf")
  if meta.get("state_checksum", checksum) != checksum:
    raise ValueError(f"the restored state's checksum {checksum} is not the saved "
                     f"{meta['state_checksum']} (corrupted array files)")
  return r["state"], meta, data_iter


def _shapes(tree: Any) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(path: str, saved: Any, abstract_state: Any) -> None:
  """Raises ConfigError if the checkpoint's arrays are not the ones this config builds."""
  if saved is None:
    raise ValueError("the state item has no metadata")
  saved, wanted = _shapes(saved), _shapes(abstract_state)
  if saved == wanted:
    return
  diffs = [f"{k}: {saved.get(k, 'absent')} saved, {wanted.get(k, 'absent')} wanted"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  raise ConfigError(
      f"checkpoint {path} holds another model than the config builds ({len(diffs)} arrays differ, "
      f"e.g. {'; '.join(diffs[:3])}); use the config it was trained with, or a new --workdir")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   new_iter: Callable[[], Any], check_meta: Callable[[dict], None], *,
                   move_aside: bool, error_log: ErrorLog | None = None
                   ) -> tuple[Any, dict, Any] | None:
  """(state, meta, data iterator) of the newest step that loads, or None.

  A step that fails to load is skipped with a warning. With `move_aside` (a training run), once an
  older step has loaded, the broken ones are renamed `<step>.unreadable-<time>` (kept for
  inspection, no longer listed) so that the resumed run can write those steps again; when none
  loads (which may be a transient fault, e.g. out of memory) nothing is moved.
  `check_meta(meta)` raises ConfigError when a checkpoint does not fit this run (e.g. another
  tokenizer); that is not a broken checkpoint, and it propagates. The warning is one line; the
  full traceback goes to `error_log` when given.
  """
  restored, unreadable = None, []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = _restore(mngr, step, check_meta, abstract_state, new_iter)
      break
    except ConfigError:
      raise
    except Exception as e:  # any unreadable checkpoint is skipped, loudly
      path = os.path.join(str(mngr.directory), str(step))
      unreadable.append(path)
      where = ""
      if error_log is not None:
        error_log.write(f"checkpoint {path} is unreadable:\n" + "".join(
            traceback.format_exception(type(e), e, e.__traceback__)))
        where = f"; traceback in {error_log.path}"
      logging.warning("checkpoint %s is unreadable and was skipped (%s%s)", path, _describe(e),
                      where)
  if move_aside and restored is not None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint: every process tried to restore")
    if jax.process_index() == 0:
      for path in unreadable:
        aside = f"{path}.unreadable-{int(time.time())}"
        os.rename(path, aside)
        logging.warning("moved the unreadable checkpoint %s to %s", path, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint: unreadable steps moved aside")
    mngr.reload()
  return restored


def restore_from_path(path: str, abstract_state: Any, new_iter: Callable[[], Any],
                      check_meta: Callable[[dict], None]) -> tuple[Any, dict, Any]:
  """(state, meta, data iterator) of the checkpoint step directory `path`; ConfigError if not."""
  key = f"config.checkpoint.restore_from={path!r}"
  path = os.path.abspath(path.rstrip("/"))
  parent, name = os.path.split(path)
  if not name.isdigit() or not os.path.isdir(path):
    raise ConfigError(f"{key}: not a checkpoint step directory (expected "
                      "<workdir>/checkpoints/<step>)")
  mngr = open_manager(parent)
  try:
    return _restore(mngr, int(name), check_meta, abstract_state, new_iter)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"{key}: cannot be loaded ({_describe(e)})") from e
  finally:
    mngr.close()


def _describe(e: Exception) -> str:
  """The exception's type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
