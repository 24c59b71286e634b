"""The training loop (nanodo style): set up, restore, step, evaluate, checkpoint, log.

Guarantees (docs/reliability.md): re-running the same command resumes from the newest readable
checkpoint with the data iterator where it was, so losses continue bit-identically on CPU;
SIGTERM/SIGINT finish the current step, checkpoint and exit 0 (a second signal aborts); a
non-finite loss or gradient never reaches the parameters.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from research import config as config_lib
from research.data import corpus, pipeline
from research.data import tokenizer as tokenizer_lib
from research.model.lm import LanguageModel
from research.train import checkpoint, flops, peak
from research.train import mesh as mesh_lib
from research.train import metrics as metrics_lib
from research.train import optimizer as optimizer_lib
from research.train import step as step_lib

# Config sections whose change makes an existing workdir's checkpoints meaningless.
RUN_DEFINING = ("seed", "model", "data.source", "data.train_files", "data.valid_files",
                "data.text_key", "data.valid_fraction", "data.split_seed", "data.seq_len",
                "data.tokenizer", "data.bpe_vocab_size", "train.batch_size")


@dataclasses.dataclass
class Run:
  """Everything built before the first step; shared by train and eval."""

  cfg: mlc.ConfigDict  # with derived fields (vocab_size, head_dim)
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: Any
  train_docs: Any
  valid_docs: Any
  total_steps: int
  graphdef: nnx.GraphDef
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_shardings: Any
  schedule: optax.Schedule
  tx: optax.GradientTransformation

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def total_steps(cfg: mlc.ConfigDict) -> int:
  """train.steps, or the steps that spend train.flop_budget (paper convention, forward FLOPs)."""
  if cfg.train.flop_budget <= 0:
    return cfg.train.steps
  per_step = (flops.paper_flops_per_token(cfg.model, cfg.data.seq_len)
              * cfg.train.batch_size * cfg.data.seq_len)
  return max(1, int(cfg.train.flop_budget // per_step))


def check_workdir_config(cfg: mlc.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run with different run-defining keys (unless allowed)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = mlc.ConfigDict(json.load(f))
    changed = [k for k in RUN_DEFINING if _get(old, k) != _get(cfg, k)]
    if changed and not cfg.allow_config_change:
      details = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(cfg, k)!r}" for k in changed)
      raise config_lib.ConfigError(
          f"{workdir} holds a run with a different config ({details}). Use a new --workdir, or "
          "pass --config.allow_config_change=True to resume it anyway.")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(cfg.to_json_best_effort(indent=1))
    os.replace(tmp, path)


def _get(cfg: mlc.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg.get(part) if isinstance(cfg, mlc.ConfigDict) else None
  return cfg.to_dict() if isinstance(cfg, mlc.ConfigDict) else cfg


def setup(cfg: mlc.ConfigDict, workdir: str) -> Run:
  mesh = mesh_lib.make_mesh(cfg.mesh)
  config_lib.validate_against_devices(cfg, tuple(mesh.shape.values()), jax.process_count())
  cache_dir = cfg.data.cache_dir or os.path.join(workdir, "cache")
  train_docs, valid_docs = corpus.load_split(cfg.data, cache_dir)
  tok = tokenizer_lib.get_tokenizer(cfg.data, cache_dir, train_docs)
  cfg = config_lib.with_derived(cfg, tok.get_vocab_size())
  check_workdir_config(cfg, workdir)

  steps = total_steps(cfg)
  schedule = optimizer_lib.make_schedule(cfg.train, steps)
  tx = optimizer_lib.make_optimizer(cfg.train, steps)

  def init_state(key: jax.Array) -> step_lib.TrainState:
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(key))
    _, params, other = nnx.split(model, nnx.Param, ...)
    return dict(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                params=params, other=other, opt=tx.init(params))

  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    abstract = jax.eval_shape(init_state, jax.random.key(cfg.seed))
    shardings = nnx.get_named_sharding(abstract, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))
  run = Run(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tok, train_docs=train_docs,
            valid_docs=valid_docs, total_steps=steps, graphdef=graphdef,
            abstract_state=checkpoint.abstract_with_shardings(abstract, shardings),
            state_shardings=shardings, schedule=schedule, tx=tx)
  run.init_state = init_state
  return run


def make_iterator(run: Run, docs, *, train: bool):
  cfg = run.cfg
  micro = cfg.train.batch_size // cfg.train.grad_accum
  per_process = (cfg.train.batch_size if train else micro) // jax.process_count()
  ds = pipeline.make_dataset(
      docs, run.tokenizer, seq_len=cfg.data.seq_len, batch_size=per_process, seed=cfg.seed,
      shuffle=train, repeat=True, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=cfg.data.num_threads,
      prefetch=cfg.data.prefetch, worker_count=cfg.data.worker_count if train else 0)
  return iter(ds)


def evaluate(run: Run, eval_step, state) -> dict[str, float]:
  """Mean validation NLL over the same eval_batches batches every time."""
  it = make_iterator(run, run.valid_docs, train=False)
  total, count = 0.0, 0.0
  for _ in range(run.cfg.train.eval_batches):
    t, c = eval_step(state, mesh_lib.host_to_global(next(it), run.mesh))
    total, count = total + float(t), count + float(c)
  nll = total / max(count, 1.0)
  return {"nll": nll, "ppl": float(np.exp(min(nll, 50.0))), "targets": count}


class SignalGuard:
  """First SIGTERM/SIGINT asks the loop to stop after the current step; the second aborts."""

  def __init__(self):
    self.requested = None
    self.previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.requested is not None:
      print(f"second {signal.Signals(signum).name}: aborting without a checkpoint",
            file=sys.stderr, flush=True)
      os._exit(130)
    self.requested = signal.Signals(signum).name

  def should_stop(self) -> bool:
    flag = self.requested is not None
    if jax.process_count() > 1:  # every process stops at the same step
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag


def restore_or_init(run: Run, mngr, data_iter) -> tuple[Any, int]:
  """The restored (state, step) of restore_from / the newest readable checkpoint, or a fresh one."""
  cfg = run.cfg
  restored = None
  if cfg.checkpoint.restore_from:
    restored = checkpoint.restore_from_path(cfg.checkpoint.restore_from, run.abstract_state,
                                            data_iter)
  elif mngr.all_steps():
    restored = checkpoint.restore_latest(mngr, run.abstract_state, data_iter)
    if restored is None:
      logging.warning("no checkpoint in %s could be loaded; starting from scratch", mngr.directory)
  if restored is None:
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
      state = jax.jit(run.init_state, out_shardings=run.state_shardings)(
          jax.random.key(cfg.seed))
    return state, 0
  state, meta = restored
  vocab = run.tokenizer.get_vocab_size()
  if meta.get("tokenizer_vocab") != vocab:
    raise config_lib.ConfigError(
        f"the checkpoint was trained with a {meta.get('tokenizer_vocab')}-token tokenizer but "
        f"config.data.tokenizer={cfg.data.tokenizer!r} gives {vocab} tokens")
  return state, int(meta["step"])


def compile_steps(run: Run):
  cfg = run.cfg
  batch_sharding = mesh_lib.batch_sharding(run.mesh)
  train_step = step_lib.make_train_step(run.graphdef, run.tx, run.schedule, cfg.train.grad_accum,
                                        policy=cfg.train.nonfinite)
  train_step = jax.jit(train_step, in_shardings=(run.state_shardings, batch_sharding),
                       out_shardings=(run.state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(run.graphdef),
                      in_shardings=(run.state_shardings, batch_sharding))
  return train_step, eval_step


def perf_metrics(run: Run, steps: int, seconds: float) -> dict[str, float]:
  """Throughput over `steps` steps that took `seconds`, with analytic FLOPs and MFU."""
  cfg = run.cfg
  tokens = steps * cfg.train.batch_size * cfg.data.seq_len
  flop_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
  peak_flops, _ = peak.peak_flops_per_device()
  # Simulated CPU devices share one host: the probe already measured the whole host.
  devices = jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
  achieved = tokens * flop_per_token / seconds
  return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / steps,
          "flops_per_s": achieved, "mfu": achieved / (peak_flops * devices)}


def train(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final validation metrics."""
  run = setup(cfg, workdir)
  cfg = run.cfg
  writer = metrics_lib.MetricWriter(workdir, cfg, enabled=run.is_main)
  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
  train_iter = make_iterator(run, run.train_docs, train=True)
  state, step = restore_or_init(run, mngr, train_iter)
  train_step, eval_step = compile_steps(run)
  meta = {"tokenizer_vocab": run.tokenizer.get_vocab_size(), "config": cfg.to_dict()}

  def save(state) -> int:
    """Checkpoints `state` under its own step; a state frozen by a bad step is saved as the
    last good one (skipped reset), so a resumed run can continue from it."""
    at, skipped = (int(x) for x in jax.device_get((state["step"], state["skipped"])))
    if skipped and cfg.train.nonfinite == "stop":
      state = dict(state, skipped=jnp.zeros_like(state["skipped"]))
    checkpoint.save(mngr, at, state, train_iter, dict(meta, step=at))
    return at

  if run.is_main:
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("%s: %d params, %d steps (from step %d), mesh %s", workdir, n_params,
                 run.total_steps, step, dict(run.mesh.shape))
  bar = tqdm(total=run.total_steps, initial=step, disable=not (run.is_main and cfg.train.progress),
             mininterval=2.0, dynamic_ncols=True, file=sys.stderr)
  pending, status = None, "ok"
  t_last, step_last = time.perf_counter(), step
  with SignalGuard() as guard:
    while step < run.total_steps:
      batch = mesh_lib.host_to_global(next(train_iter), run.mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      if pending is not None:  # the previous step's metrics: no host sync on the current one
        status = _report(run, writer, bar, *pending, t_last, step_last)
        if pending[0] % cfg.train.log_every == 0:
          t_last, step_last = time.perf_counter(), pending[0]
      pending = (step, step_metrics)
      if status != "ok":
        pending = None  # the state is frozen at the last good step; its metrics mean nothing
        break
      if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < run.total_steps:
        writer.write(step, evaluate(run, eval_step, state), kind="valid")
      if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        save(state)
      if guard.should_stop():
        status = f"stopped by {guard.requested}"
        break
    if pending is not None:
      last = _report(run, writer, bar, *pending, t_last, step_last)
      status = last if last != "ok" else status
    final_step = save(state)
    mngr.wait_until_finished()
  bar.close()
  result = {}
  if status.startswith("stopped"):
    print(f"{status} at step {final_step}; checkpoint saved in {mngr.directory}", flush=True)
  elif status == "nonfinite":
    print(f"non-finite loss or gradient at step {final_step + 1}; last good state (step "
          f"{final_step}) saved in {mngr.directory}", flush=True)
  else:
    result = evaluate(run, eval_step, state)
    writer.write(final_step, result, kind="valid")
    if run.is_main:
      print(f"step {final_step}: validation nll {result['nll']:.4f} (ppl {result['ppl']:.2f})",
            flush=True)
  mngr.close()
  writer.close()
  return dict(result, status=status, step=final_step)


def _report(run: Run, writer, bar, step: int, step_metrics, t_last: float,
            step_last: int) -> str:
  """Fetches a finished step's metrics; logs them; returns ok / nonfinite / too_many_skipped."""
  cfg = run.cfg
  m = jax.device_get(step_metrics)
  if not bool(m["finite"]):
    if cfg.train.nonfinite == "stop" or int(m["skipped"]) >= cfg.train.max_skipped:
      return "nonfinite"
    logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                    int(m["skipped"]))
  if step % cfg.train.log_every == 0 or step == run.total_steps:
    elapsed = time.perf_counter() - t_last
    record = dict(m, **perf_metrics(run, max(step - step_last, 1), elapsed))
    writer.write(step, record)
    bar.set_postfix(loss=f"{float(m['loss']):.3f}", refresh=False)
  bar.update(step - bar.n)
  return "ok"


def evaluate_checkpoint(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
  """Validation NLL of the newest readable checkpoint in `workdir` (or restore_from)."""
  run = setup(cfg, workdir)
  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=False)
  data_iter = make_iterator(run, run.train_docs, train=True)
  if not (cfg.checkpoint.restore_from or mngr.all_steps()):
    raise config_lib.ConfigError(f"config.mode='eval': {workdir} holds no checkpoint to evaluate")
  state, step = restore_or_init(run, mngr, data_iter)
  _, eval_step = compile_steps(run)
  result = evaluate(run, eval_step, state)
  if run.is_main:
    print(f"step {step}: validation nll {result['nll']:.4f} (ppl {result['ppl']:.2f})",
          flush=True)
  mngr.close()
  return dict(result, step=step)
