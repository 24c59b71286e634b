"""The training loop (nanodo style): set up, restore, step, evaluate, checkpoint, log.

Guarantees (docs/reliability.md): re-running the same command resumes from the newest readable
checkpoint with the data iterator where it was, so losses continue bit-identically on CPU, and
metrics.jsonl keeps one record per step; SIGTERM/SIGINT, from set-up on, finish the current step,
checkpoint and exit 0 (a second signal aborts); a non-finite loss or gradient never reaches the
parameters, and no checkpoint holds NaN or Inf.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
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

from configs import base
from research import config as config_lib
from research.convert import load, recursive_init
from research.data import corpus, pipeline, readers
from research.data import tokenizer as tokenizer_lib
from research.model.lm import LanguageModel
from research.train import checkpoint, flops, peak
from research.train import mesh as mesh_lib
from research.train import metrics as metrics_lib
from research.train import optimizer as optimizer_lib
from research.train import step as step_lib
from research.train import workdir as workdir_lib

CHECKPOINTED = "checkpointed"  # <workdir>/checkpointed: a checkpoint of this run was completed
ERROR_LOG = "errors.log"  # <workdir>/errors.log: full tracebacks of checkpoint failures

# Config sections whose change makes an existing workdir's checkpoints meaningless.
RUN_DEFINING = ("seed", "data.seed", "model", "data.source", "data.train_files", "data.valid_files",
                "data.text_key", "data.valid_fraction", "data.split_seed", "data.seq_len",
                "data.tokenizer", "data.bpe_vocab_size", "data.shuffle_window", "train.batch_size")

# Model keys read only when decoding (research/model/early_exit.py): not run-defining.
DECODE_ONLY = ("model.recursion.exit_threshold",)

# Train keys that change the run from here on without making its checkpoints meaningless; a
# resumed run names those that differ from the workdir's config.json.
RUN_SHAPING = ("train.steps", "train.flop_budget", "train.lr", "train.schedule",
               "train.warmup_fraction", "train.warmup_steps", "train.decay_fraction",
               "train.min_lr_ratio", "train.b1", "train.b2", "train.eps", "train.weight_decay",
               "train.grad_clip", "train.grad_accum", "train.nonfinite", "train.max_skipped",
               "train.exit_loss", "train.exit_coeff", "train.exit_kd_coeff", "train.distill",
               "data.positions", "data.score_boundary_targets", "data.row_length",
               "data.skip_bad_records")


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
  """train.steps, or the whole steps that fit in train.flop_budget (paper convention, forward
  FLOPs; floored, so a run never spends more than its budget)."""
  if cfg.train.flop_budget <= 0:
    return cfg.train.steps
  return max(1, math.floor(cfg.train.flop_budget / flops_per_step(cfg)))  # docs/sweeps.md


def flops_per_step(cfg: mlc.ConfigDict) -> float:
  """Paper-convention FLOPs of one optimizer step (forward, flops.paper_flops_per_token)."""
  return (flops.paper_flops_per_token(cfg.model, cfg.data.seq_len)
          * cfg.train.batch_size * cfg.data.seq_len)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
  return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def check_workdir_config(cfg: mlc.ConfigDict, workdir: str) -> list[str]:
  """Refuses a workdir that holds a run with different run-defining keys (unless allowed) and
  returns the run-shaping keys that differ, as "key: old -> new". Writes nothing (a training
  run records its config with record_config once every check has passed). A key the saved
  config lacks (added to the code since) counts as its configs/base.py default."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return []
  new = _flatten(json.loads(cfg.to_json_best_effort()))
  try:
    with open(path) as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"{path}: unreadable ({e}); move it away to start over") from None
  old = _flatten(json.loads(base.get_config().to_json_best_effort())) | saved
  keys = sorted(set(old) | set(new))
  diff = lambda k: f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
  changed = [k for k in keys
             if _matches(k, RUN_DEFINING) and not _matches(k, DECODE_ONLY)
             and old.get(k, "(absent)") != new.get(k, "(absent)")]
  if changed and not cfg.allow_config_change:
    details = "; ".join(diff(k) for k in changed[:5])
    more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
    raise config_lib.ConfigError(
        f"{workdir} holds a run with a different config ({details}{more}). Use a new "
        "--workdir, or pass --config.allow_config_change=True to resume it anyway.")
  return [diff(k) for k in keys
          if _matches(k, RUN_SHAPING) and old.get(k, "(absent)") != new.get(k, "(absent)")]


def record_config(cfg: mlc.ConfigDict, workdir: str) -> None:
  """Writes <workdir>/config.json atomically (training runs, on process 0)."""
  if cfg.mode != "train" or jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json_best_effort(indent=1))
  os.replace(tmp, path)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def setup(cfg: mlc.ConfigDict, workdir: str) -> Run:
  mesh = mesh_lib.make_mesh(cfg.mesh)
  cache_dir = cfg.data.cache_dir or os.path.join(workdir, "cache")
  if cfg.model.init_from:  # architecture, vocabulary and tokenizer come from the checkpoint
    cfg = recursive_init.with_pretrained(cfg, cache_dir)
  config_lib.validate_against_devices(cfg, tuple(mesh.shape.values()), jax.process_count())
  try:
    train_docs, valid_docs = corpus.load_split(cfg.data, cache_dir)
    tok = tokenizer_lib.get_tokenizer(cfg.data, cache_dir, train_docs)
  except (OSError, ValueError) as e:  # missing, empty or malformed data / tokenizer files
    raise config_lib.ConfigError(
        f"config.data (source={cfg.data.source!r}, train_files={cfg.data.train_files!r}, "
        f"tokenizer={cfg.data.tokenizer!r}): {e}") from e
  cfg = config_lib.with_derived(cfg, tok.get_vocab_size())
  config_changes = check_workdir_config(cfg, workdir)
  if cfg.train.eval_batches == -1 and jax.process_count() > 1:
    raise config_lib.ConfigError(
        "config.train.eval_batches=-1: the whole-split evaluation runs on one process only; "
        "give a batch count")

  steps = total_steps(cfg)
  schedule = optimizer_lib.make_schedule(cfg.train, steps)
  tx = optimizer_lib.make_optimizer(cfg.train, steps)

  init_state = step_lib.make_init_state(cfg.model, tx)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    abstract = jax.eval_shape(init_state, jax.random.key(cfg.seed))
    shardings = nnx.get_named_sharding(abstract, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))
  run = Run(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tok, train_docs=train_docs,
            valid_docs=valid_docs, total_steps=steps, graphdef=graphdef,
            abstract_state=checkpoint.abstract_with_shardings(abstract, shardings),
            state_shardings=shardings, schedule=schedule, tx=tx)
  run.init_state = init_state
  run.config_changes = config_changes
  check_eval_batches(run)
  return run


def make_iterator(run: Run, docs, *, train: bool, repeat: bool = True):
  """Batches of `docs` (train: shuffled, full batches); `repeat=False`: one pass, keeping the
  last, smaller batch."""
  cfg = run.cfg
  micro = cfg.train.batch_size // cfg.train.grad_accum
  per_process = (cfg.train.batch_size if train else micro) // jax.process_count()
  ds = pipeline.make_dataset(
      docs, run.tokenizer, seq_len=cfg.data.seq_len, batch_size=per_process,
      seed=data_seed(cfg), shuffle=train, repeat=repeat, drop_remainder=repeat,
      process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=cfg.data.num_threads,
      prefetch=cfg.data.prefetch, worker_count=cfg.data.worker_count if train else 0,
      skip_bad_records=cfg.data.skip_bad_records, positions=cfg.data.positions,
      score_boundary_targets=cfg.data.score_boundary_targets, row_length=cfg.data.row_length,
      shuffle_window=cfg.data.shuffle_window)
  return iter(ds)


def bad_records(run: Run) -> int:
  """Bad records the readers of this process skipped (config.data.skip_bad_records)."""
  readers_seen = {id(getattr(d, "docs", d)): getattr(d, "docs", d)
                  for d in (run.train_docs, run.valid_docs)}
  return sum(getattr(r, "bad_records", 0) for r in readers_seen.values())


def data_seed(cfg: mlc.ConfigDict) -> int:
  """The seed of the training-document shuffle: config.data.seed, or config.seed if it is -1."""
  return cfg.seed if cfg.data.seed == -1 else cfg.data.seed


def next_batch(data_iter, where: str):
  """next(data_iter); a bad data record (readers.BadRecordError) becomes a one-line ConfigError."""
  try:
    return next(data_iter)
  except readers.BadRecordError as e:
    raise config_lib.ConfigError(
        f"{e} ({where}; pass --config.data.skip_bad_records=True to skip and count such "
        "records)") from None


def valid_batches(run: Run) -> int:
  """How many full validation batches one pass over the validation split holds (this process's
  shard; packing leaves no gaps, so it is tokens // (tokens per row * micro-batch))."""
  cfg = run.cfg
  micro = cfg.train.batch_size // cfg.train.grad_accum // jax.process_count()
  shard = readers.Subset(run.valid_docs, np.arange(len(run.valid_docs))[
      jax.process_index()::jax.process_count()])
  row = cfg.data.seq_len + (1 if cfg.data.row_length == "T+1" else 0)
  return pipeline.count_tokens(shard, run.tokenizer) // (row * micro)


def check_eval_batches(run: Run) -> None:
  """Refuses a train.eval_batches that would wrap around the validation split (its batches
  would be counted twice)."""
  n = run.cfg.train.eval_batches
  if n == -1:
    return
  fit = valid_batches(run)
  if n > fit:
    raise config_lib.ConfigError(
        f"config.train.eval_batches={n}: the validation split ({len(run.valid_docs)} documents) "
        f"holds only {fit} batches of {run.cfg.train.batch_size // run.cfg.train.grad_accum} "
        f"rows, so batches would be scored twice; use at most "
        f"{fit}, or -1 for the whole split once")


def evaluate(run: Run, eval_step, state) -> dict[str, float]:
  """Mean validation NLL (and NLL at every exit with early exits) over the same eval_batches
  batches every time; eval_batches=-1: over the whole validation split once (the last batch
  padded with rows that score nothing). `targets` is how many distinct targets were scored."""
  whole = run.cfg.train.eval_batches == -1
  it = make_iterator(run, run.valid_docs, train=False, repeat=not whole)
  totals, count, batches = {}, 0.0, 0
  while whole or batches < run.cfg.train.eval_batches:
    try:
      batch = next_batch(it, "validation data")
    except StopIteration:
      break
    if whole:
      batch = pad_batch(batch, run.cfg.train.batch_size // run.cfg.train.grad_accum
                        // jax.process_count())
    sums, c = jax.device_get(eval_step(state, mesh_lib.host_to_global(batch, run.mesh)))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    count += float(c)
    batches += 1
  means = {k: v / max(count, 1.0) for k, v in totals.items()}
  return dict(means, ppl=float(np.exp(min(means["nll"], 50.0))), targets=count,
              batches=float(batches))


def pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """`batch` with rows of segment 0 (padding: no target is scored) up to `rows` rows."""
  missing = rows - batch["tokens"].shape[0]
  if missing <= 0:
    return batch
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
          for k, v in batch.items()}


def nll_message(result: dict[str, float]) -> str:
  """'validation nll 4.1234 (ppl 61.80)', then the NLL at each exit when there are exits."""
  exits = [f"{result[k]:.4f}" for k in sorted(result) if k.startswith("nll/exit_")]
  text = f"validation nll {result['nll']:.4f} (ppl {result['ppl']:.2f})"
  return text + (f"; per exit {' '.join(exits)}" if exits else "")


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
    name = signal.Signals(signum).name
    if self.requested is not None:
      os.write(2, f"second signal ({name}): aborting without a checkpoint\n".encode())
      os._exit(130)
    self.requested = name
    os.write(2, f"{name}: stopping after the current step with a checkpoint (signal again to "
                "abort)\n".encode())

  def should_stop(self) -> bool:
    flag = self.requested is not None
    if jax.process_count() > 1:  # every process stops at the same step
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag


def tokenizer_facts(tok) -> dict:
  """What a checkpoint records about its tokenizer, to refuse loading it with another one."""
  return {"tokenizer_vocab": tok.get_vocab_size(),
          "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()}


def check_tokenizer(run: Run, meta: dict) -> None:
  """Raises ConfigError if the checkpoint `meta` was trained with another tokenizer."""
  facts = tokenizer_facts(run.tokenizer)
  if meta.get("tokenizer_vocab") != facts["tokenizer_vocab"]:
    raise config_lib.ConfigError(
        f"config.data.tokenizer={run.cfg.data.tokenizer!r} (bpe_vocab_size="
        f"{run.cfg.data.bpe_vocab_size}) gives {facts['tokenizer_vocab']} tokens but the "
        f"checkpoint at step {meta.get('step')} was trained with a "
        f"{meta.get('tokenizer_vocab')}-token tokenizer")
  if meta.get("tokenizer_sha256", facts["tokenizer_sha256"]) != facts["tokenizer_sha256"]:
    raise config_lib.ConfigError(
        f"config.data.tokenizer={run.cfg.data.tokenizer!r}: not the tokenizer the checkpoint at "
        f"step {meta.get('step')} was trained with (same size, different vocabulary or merges)")


def restore_or_init(run: Run, mngr, *, for_eval: bool = False,
                    error_log: checkpoint.ErrorLog | None = None) -> tuple[Any, int, Any]:
  """(state, step, train iterator): the run's newest readable checkpoint, else restore_from,
  else a fresh start. The run's own checkpoints win over restore_from so that a restarted run
  never rolls back (`for_eval`: restore_from wins); if none of them loads, that is an error."""
  cfg = run.cfg
  new_iter = lambda: make_iterator(run, run.train_docs, train=True)
  check = lambda meta: check_tokenizer(run, meta)
  restored = None
  own = bool(mngr.all_steps()) and not (for_eval and cfg.checkpoint.restore_from)
  if own:
    restored = checkpoint.restore_latest(mngr, run.abstract_state, new_iter, check,
                                         move_aside=not for_eval, error_log=error_log)
    if restored is None:
      raise config_lib.ConfigError(
          f"no checkpoint in {mngr.directory} could be loaded (each is named in a warning above); "
          "move them away to start over, or use a new --workdir")
    if cfg.checkpoint.restore_from:
      logging.warning("config.checkpoint.restore_from=%r is ignored: %s holds this run's own "
                      "checkpoints (to roll back, use a new --workdir)",
                      cfg.checkpoint.restore_from, mngr.directory)
  elif cfg.checkpoint.restore_from:
    restored = checkpoint.restore_from_path(cfg.checkpoint.restore_from, run.abstract_state,
                                            new_iter, check)
  if restored is None:
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
      state = jax.jit(run.init_state, out_shardings=run.state_shardings)(
          jax.random.key(cfg.seed))
    return with_pretrained_params(run, state), 0, new_iter()
  state, meta, data_iter = restored
  return state, int(meta["step"]), data_iter


def with_pretrained_params(run: Run, state: step_lib.TrainState) -> step_lib.TrainState:
  """Overwrites the fresh params with model.init_from's (converted to the recursive layout)."""
  pure = recursive_init.init_params_from_config(run.cfg.model, seed=run.cfg.seed)
  if pure is None:
    return state
  params = state["params"]
  nnx.replace_by_pure_dict(params, pure)
  place = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i])
  return dict(state, params=jax.tree.map(place, params, run.state_shardings["params"]))


def load_teacher(run: Run) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, sharded params, their shardings) of the distillation teacher: the untied
  (vanilla) model of config.train.distill.teacher, else of config.model.init_from."""
  cfg = run.cfg
  path = cfg.train.distill.teacher or cfg.model.init_from
  base = mlc.ConfigDict(cfg.model.to_dict())
  base.init_from = ""
  base.mor.kind = "none"
  base.recursion.update(strategy="none", num_recursions=1, lora_rank=0, share_norms=True,
                        lora_merged=False, early_exit=False)
  teacher_cfg, teacher = load.build_model_from_pretrained(path, base)
  if teacher_cfg.vocab_size != cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.train.distill.teacher={path!r}: its vocabulary has {teacher_cfg.vocab_size} "
        f"entries, the student's config.model.vocab_size is {cfg.model.vocab_size}")
  graphdef, params = nnx.split(teacher, nnx.Param)
  with jax.set_mesh(run.mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    shardings = nnx.get_named_sharding(params, run.mesh)
  place = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i])
  return graphdef, jax.tree.map(place, params, shardings), shardings


def compile_steps(run: Run):
  """(train_step(state, batch), eval_step(state, batch)), jitted with the run's shardings; a
  distillation teacher is loaded here and bound into train_step."""
  cfg = run.cfg
  batch_sharding = mesh_lib.batch_sharding(run.mesh)
  objective = step_lib.Objective.from_config(cfg)
  teacher_graphdef = teacher_params = None
  in_shardings = (run.state_shardings, batch_sharding)
  if objective.distill_coeff:
    teacher_graphdef, teacher_params, teacher_shardings = load_teacher(run)
    in_shardings += (teacher_shardings,)
  train_step = step_lib.make_train_step(run.graphdef, run.tx, run.schedule, cfg.train.grad_accum,
                                        policy=cfg.train.nonfinite, objective=objective,
                                        teacher_graphdef=teacher_graphdef)
  train_step = jax.jit(train_step, in_shardings=in_shardings,
                       out_shardings=(run.state_shardings, None), donate_argnums=0)
  if teacher_params is not None:
    jitted = train_step

    def train_step(state, batch):
      return jitted(state, batch, teacher_params)
  eval_step = jax.jit(step_lib.make_eval_step(run.graphdef, objective),
                      in_shardings=(run.state_shardings, batch_sharding))
  if run.mesh.shape.get("expert", 1) > 1:  # expert parallelism reads the mesh while tracing
    train_step, eval_step = (mesh_lib.under_mesh(f, run.mesh) for f in (train_step, eval_step))
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


def train(cfg: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final validation metrics, the status
  (ok, "stopped by SIGTERM", nonfinite) and the step of the last checkpoint."""
  with SignalGuard() as guard:  # from the start: a signal during set-up or compilation counts
    # a mesh the devices cannot hold is refused before the workdir is made (with
    # model.init_from, setup checks it once the checkpoint's architecture is known)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    if not cfg.model.init_from:
      config_lib.validate_against_devices(cfg, tuple(mesh.shape.values()), jax.process_count())
    lock = contextlib.nullcontext()
    if jax.process_index() == 0:  # before anything in the workdir is touched
      workdir_lib.prepare(workdir)
      lock = workdir_lib.WorkdirLock(workdir)
    with lock, checkpoint.ErrorLog(os.path.join(workdir, ERROR_LOG)) as error_log:
      try:
        return _train(cfg, workdir, guard, error_log)
      except checkpoint.CheckpointWriteError as e:
        if error_log.count and not error_log.unwritable:
          raise checkpoint.CheckpointWriteError(f"{e} (tracebacks in {error_log.path})") from e
        raise


def check_not_emptied(run: Run, mngr, writer) -> None:
  """Refuses a workdir whose checkpoints are gone though it had some (metrics.jsonl and
  config.json remain), unless config.train.start_over; then the old records are dropped."""
  marker = os.path.join(run.workdir, CHECKPOINTED)
  if mngr.all_steps() or run.cfg.checkpoint.restore_from or not os.path.exists(marker):
    return
  if not run.cfg.train.start_over:
    raise config_lib.ConfigError(
        f"--workdir={run.workdir}: its checkpoints are gone ({mngr.directory} holds none) but "
        "metrics.jsonl and config.json of an earlier run remain; pass "
        "--config.train.start_over=True to train again from step 0 (their records are dropped)")
  logging.warning("config.train.start_over=True: %s starts again from step 0", run.workdir)
  if run.is_main:
    writer.truncate(0)
    os.remove(marker)


def _train(cfg: mlc.ConfigDict, workdir: str, guard: SignalGuard,
           error_log: checkpoint.ErrorLog) -> dict[str, Any]:
  run = setup(cfg, workdir)
  cfg = run.cfg
  writer = metrics_lib.MetricWriter(workdir, cfg, enabled=run.is_main)
  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
  bar, write_failed = None, False
  try:
    check_not_emptied(run, mngr, writer)
    state, step, train_iter = restore_or_init(run, mngr, error_log=error_log)
    if step and run.config_changes and run.is_main:
      logging.warning("resuming %s at step %d with changed run-shaping keys: %s", workdir, step,
                      "; ".join(run.config_changes))
    record_config(cfg, workdir)  # only now: every check has passed
    writer.truncate(step)  # records logged after this checkpoint by a killed run are redone
    train_step, eval_step = compile_steps(run)
    meta = dict(tokenizer_facts(run.tokenizer), config=cfg.to_dict())
    in_flight = None  # the step whose checkpoint is being written

    def settle(wait: bool) -> None:
      """Checks the checkpoint in flight (`wait`: waits for it); a failed write raises
      CheckpointWriteError, a completed one marks the workdir as checkpointed."""
      nonlocal in_flight
      if in_flight is not None and checkpoint.confirm(mngr, in_flight, wait=wait):
        in_flight = None
        marker = os.path.join(workdir, CHECKPOINTED)
        if run.is_main and not os.path.exists(marker):
          with open(marker, "w") as f:
            f.write("a checkpoint of this run was completed; see check_not_emptied\n")

    def save(state) -> int:
      """Checkpoints `state` under its own step; a state frozen by a bad step is saved as the
      last good one (skipped reset), so a resumed run can continue from it."""
      nonlocal in_flight
      settle(wait=True)
      at, skipped = (int(x) for x in jax.device_get((state["step"], state["skipped"])))
      if skipped and cfg.train.nonfinite == "stop":
        state = dict(state, skipped=jnp.zeros_like(state["skipped"]))
      checkpoint.save(mngr, at, state, train_iter, dict(meta, step=at))
      in_flight = at
      return at

    if run.is_main and cfg.train.flop_budget > 0:
      per_step = flops_per_step(cfg)
      print(f"config.train.flop_budget={cfg.train.flop_budget:g}: {run.total_steps} steps of "
            f"{per_step:.4g} FLOPs (budget / FLOPs per step = "
            f"{cfg.train.flop_budget / per_step:.2f}, floored)", file=sys.stderr, flush=True)
    if run.is_main:
      n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
      logging.info("%s: %d params, %d steps (from step %d), mesh %s", workdir, n_params,
                   run.total_steps, step, dict(run.mesh.shape))
    bar = tqdm(total=run.total_steps, initial=step, mininterval=2.0, dynamic_ncols=True,
               disable=not (run.is_main and cfg.train.progress), file=sys.stderr)
    pending, status, bad_step = None, "ok", None
    t_last, step_last = time.perf_counter(), step

    def flush() -> str:
      """Reports the pending step's metrics: ok / nonfinite (bad_step is then set)."""
      nonlocal pending, bad_step, t_last, step_last
      if pending is None:
        return "ok"
      at, step_metrics = pending
      pending = None
      result = _report(run, writer, bar, at, step_metrics, t_last, step_last)
      if result != "ok":
        bad_step = bad_step or at
      elif at % cfg.train.log_every == 0:
        t_last, step_last = time.perf_counter(), at
      return result

    if run.is_main and step < run.total_steps:
      print(f"compiling the training step (step {step + 1} of {run.total_steps} follows) ...",
            file=sys.stderr, flush=True)
    while step < run.total_steps:
      if guard.should_stop():
        status = f"stopped by {guard.requested or 'a signal to another process'}"
        break
      batch = mesh_lib.host_to_global(next_batch(train_iter, "training data"), run.mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      settle(wait=False)  # a failed background write stops the run here
      status = flush()  # the previous step's metrics: no host sync on the current one
      if status != "ok":
        if cfg.train.nonfinite == "skip":  # the state includes this step: log it too
          pending = (step, step_metrics)
        break  # policy stop: the state is frozen at the last good step
      pending = (step, step_metrics)
      if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < run.total_steps:
        writer.write(step, evaluate(run, eval_step, state), kind="valid")
      if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        status = flush()  # a checkpoint never gets ahead of metrics.jsonl
        if status != "ok":
          break
        save(state)
    last = flush()
    status = last if last != "ok" else status
    final_step = save(state)
    settle(wait=True)
    bar.close()
    result = {}
    if status == "ok":
      result = evaluate(run, eval_step, state)
      writer.write(final_step, result, kind="valid", replace=True)  # a re-run finished run
      message = f"step {final_step}: {nll_message(result)}"
    elif status != "nonfinite":
      message = f"{status} at step {final_step}; checkpoint saved in {mngr.directory}"
    elif cfg.train.nonfinite == "stop":
      message = (f"non-finite loss, gradient or update at step {bad_step}; stopped with the last "
                 f"good state (step {final_step}) saved in {mngr.directory}")
    else:
      message = (f"config.train.max_skipped={cfg.train.max_skipped} non-finite steps in a row "
                 f"at step {bad_step}; stopped with the state of step {final_step} (skipped "
                 f"updates dropped) saved in {mngr.directory}")
    if run.is_main:
      print(message, flush=True)
    return dict(result, status=status, step=final_step)
  except checkpoint.CheckpointWriteError:
    write_failed = True
    raise
  finally:
    if bar is not None:
      bar.close()
    try:
      mngr.close()
    except Exception as e:  # after a failed write, closing fails for the same reason
      if not write_failed:
        raise
      logging.info("closing the checkpoint manager after the failed write: %s", e)
    writer.close()


def _report(run: Run, writer, bar, step: int, step_metrics, t_last: float,
            step_last: int) -> str:
  """Fetches a finished step's metrics and logs them (a non-finite step always); returns ok, or
  nonfinite when the run must stop (policy stop, or max_skipped skipped steps in a row)."""
  cfg = run.cfg
  m = jax.device_get(step_metrics)
  finite = bool(m["finite"])
  if not finite or step % cfg.train.log_every == 0 or step == run.total_steps:
    elapsed = time.perf_counter() - t_last
    record = dict(m, **perf_metrics(run, max(step - step_last, 1), elapsed))
    if cfg.data.skip_bad_records:  # skipped by this process since it started (not by workers)
      record["bad_records"] = bad_records(run)
    writer.write(step, record)
    bar.set_postfix(loss=f"{float(m['loss']):.3f}", refresh=False)
  bar.update(step - bar.n)
  if finite:
    return "ok"
  if cfg.train.nonfinite == "stop" or int(m["skipped"]) >= cfg.train.max_skipped:
    return "nonfinite"
  logging.warning("step %d: non-finite loss, gradient or update; update skipped (%d in a row)",
                  step, int(m["skipped"]))
  return "ok"


def evaluate_checkpoint(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
  """Validation NLL of config.checkpoint.restore_from, else of the newest readable checkpoint,
  else (with model.init_from) of the converted pretrained weights, before any training."""
  run = setup(cfg, workdir)
  mngr = checkpoint.open_manager(os.path.join(workdir, "checkpoints"))
  try:
    if not (cfg.checkpoint.restore_from or mngr.all_steps() or cfg.model.init_from):
      raise config_lib.ConfigError(
          f"config.mode='eval': {workdir} holds no checkpoint to evaluate (and "
          "config.model.init_from is empty)")
    with checkpoint.ErrorLog(os.path.join(workdir, ERROR_LOG)) as error_log:
      state, step, _ = restore_or_init(run, mngr, for_eval=True, error_log=error_log)
    _, eval_step = compile_steps(run)
    result = evaluate(run, eval_step, state)
  finally:
    mngr.close()
  if run.is_main:
    print(f"step {step}: {nll_message(result)}",
          flush=True)
  return dict(result, step=step)
