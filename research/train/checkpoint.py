"""Checkpoints: one orbax CheckpointManager per run under <workdir>/checkpoints.

Items of a step: `state` (params, other model variables, optimizer state, step), `data` (the grain
iterator state, one file per process) and `meta` (JSON: step, config, tokenizer facts). Orbax
writes each step to a temporary directory and renames it when complete, so a step killed mid-write
is never listed. A listed step that fails to load (truncated or corrupted files) is skipped with a
warning naming it, and the next older one is tried.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "data", "meta")


def make_manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS, options=options,
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict) -> None:
  """Starts saving `step` (asynchronously if the manager is async); overwrites nothing."""
  if step in mngr.all_steps():
    return
  mngr.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)))


def restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
                 data_iter: Any) -> tuple[Any, dict]:
  """Loads `step` into a state shaped/sharded like `abstract_state`; restores `data_iter`."""
  r = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter),
      meta=ocp.args.JsonRestore()))
  return r["state"], r["meta"]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: Any) -> tuple[Any, dict] | None:
  """The newest step that loads, or None when there is none; broken steps are skipped."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore_step(mngr, step, abstract_state, data_iter)
    except Exception as e:  # any unreadable checkpoint is skipped, loudly
      path = os.path.join(str(mngr.directory), str(step))
      logging.warning("checkpoint %s is unreadable and was skipped (%s: %s)", path,
                      type(e).__name__, str(e).splitlines()[0][:200])
  return None


def restore_from_path(path: str, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
  """Loads the checkpoint step directory `path` (e.g. runs/x/checkpoints/400) or raises."""
  path = os.path.abspath(path.rstrip("/"))
  parent, name = os.path.split(path)
  if not name.isdigit() or not os.path.isdir(path):
    raise ValueError(f"config.checkpoint.restore_from={path!r}: not a checkpoint step directory "
                     "(expected <workdir>/checkpoints/<step>)")
  mngr = ocp.CheckpointManager(parent, item_names=ITEMS,
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  try:
    return restore_step(mngr, int(name), abstract_state, data_iter)
  except Exception as e:
    raise ValueError(f"config.checkpoint.restore_from={path!r}: cannot be loaded "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
  finally:
    mngr.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)

