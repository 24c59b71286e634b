"""What the benchmarks share: a synthetic batch, the compiled real train step on it, `--set`
overrides and the process's CPU time."""

import ast
import resource
import sys
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags
from flax import nnx

from research import config as config_lib
from research.model.lm import LanguageModel
from research.train import mesh as mesh_lib
from research.train import optimizer as optimizer_lib
from research.train import step as step_lib


def synthetic_batch(cfg: mlc.ConfigDict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random tokens [B, T + 1]; every row is one document (full causal attention)."""
  b, t = cfg.train.batch_size, cfg.data.seq_len + 1
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((b, t), np.int32)}


def cpu_seconds() -> float:
  """CPU time of this process, all threads (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def compile_train_step(cfg: mlc.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int | None = None
                       ) -> tuple[jax.stages.Compiled, Any, dict[str, jax.Array]]:
  """(the real train step of research/train/step.py jitted and compiled for `mesh`, its initial
  state, a synthetic batch on the mesh); the state is donated. `total_steps`: the schedule's
  length (default cfg.train.steps)."""
  total = cfg.train.steps if total_steps is None else total_steps
  tx = optimizer_lib.make_optimizer(cfg.train, total)
  schedule = optimizer_lib.make_schedule(cfg.train, total)
  init_state = step_lib.make_init_state(cfg.model, tx)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    shardings = nnx.get_named_sharding(jax.eval_shape(init_state, jax.random.key(0)), mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(cfg.seed))
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_step = step_lib.make_train_step(graphdef, tx, schedule, cfg.train.grad_accum,
                                        policy=cfg.train.nonfinite)
  batch = jax.device_put(synthetic_batch(cfg, np.random.default_rng(0)), batch_sharding)
  compiled = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0
                     ).lower(state, batch).compile()
  return compiled, state, batch


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"} (values as Python literals, else strings)."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set={item}: expected dotted.key=value")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  """Parses argv (program name first) into a bench's own flags, every flag not given at its
  default (so successive calls in one process do not leak values); UsageError on extra words."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(flag_values.get_help())
    raise SystemExit(0)
  for name in flag_values:
    flag_values[name].unparse()  # back to its default
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    raise app.UsageError(str(e)) from None
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")


def run(main) -> None:
  """app.run(main) for a bench whose flags live in its own FlagValues: absl's global flags are
  marked parsed and main receives the whole command line (it parses its own with parse_flags).
  A ConfigError is one `error:` line (config_errors)."""
  app.run(config_errors(main), flags_parser=lambda argv: (flags.FLAGS(argv[:1]), argv)[1])


def config_errors(main):
  """main, with a ConfigError (a bad --set, a workdir holding another run) printed as one
  `error:` line on stderr and exit status 2 instead of a traceback."""

  def guarded(argv):
    try:
      return main(argv)
    except config_lib.ConfigError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  return guarded
