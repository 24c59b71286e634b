"""The only entry point: train, resume, evaluate or sample from a model described by a config file.

  python launch.py --config=configs/vanilla.py:tiny --workdir=runs/tiny [--config.key=value ...]
  ... --print_config            list every config key with its value and comment, then exit
  ... --config.mode=eval        validation NLL of the workdir's newest checkpoint
  ... --config.mode=generate    continue config.generate.prompt with it (docs/inference.md)

Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT with a checkpoint; 1 with a
one-line "error: ..." for a bad config, data or checkpoint, or a non-finite stop; 130 when a
second signal aborted it.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from research import config as config_lib
from research import config_doc, sweep
from research.infer import generate
from research.train import checkpoint, loop, mesh

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
flags.DEFINE_bool("sweep", False, "Run every cell of the config's get_sweep() in turn.")
flags.DEFINE_integer("sweep_index", None, "Run only this cell of the sweep (cluster job arrays).")
flags.DEFINE_bool("sweep_list", False, "Print the sweep's cells with their status.")
flags.DEFINE_enum("sweep_emit", None, ["slurm", "shell"],
                  "Write <workdir>/sweep.slurm (a job array) or sweep.sh that run the cells.")
flags.DEFINE_bool("report", False, "Collect the sweep's results into <workdir>/results.*.")
flags.DEFINE_list("sweep_seeds", [], "Run every sweep cell once per seed (e.g. 0,1), in "
                  "<cell>_seed<k>; give the same list to --report, --sweep_index and --sweep_emit.")
flags.DEFINE_bool("print_config", False,
                  "Print every key of --config (with overrides) with its value and its comment "
                  "from configs/base.py, then exit.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
HELP = ("-h", "--help", "-help", "--helpshort", "-?")


def print_help() -> None:
  print(__doc__.strip())
  print("\nKeys: every --config.<key> is listed, with its value and comment, by\n"
        "  python launch.py --config=configs/vanilla.py:tiny --print_config\n\nFlags:")
  print(FLAGS.module_help(sys.modules[__name__]) or FLAGS.main_module_help())


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in `argv` (either --config=X or --config X)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _type_name(key: str) -> str | None:
  """The type of config.<key>'s default in configs/base.py, if it has one."""
  value = config_doc.flatten(base.get_config()).get(key)
  return None if value is None else type(value).__name__


def flag_error(message: str, argv: list[str]) -> str:
  """absl's flag error as one `error:` line naming the key (or the config file)."""
  first = message.strip().splitlines()[0] if message.strip() else message
  m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", first)
  if m:
    key, value, why = m.groups()
    expected = _type_name(key)
    kind = f"not a valid {expected} value" if expected else "invalid value"
    return f"error: config.{key}={value!r}: {kind} ({why})"
  if first.startswith("flag --config="):  # the config file raised: its last line says why
    last = [line for line in message.strip().splitlines() if line.strip()][-1].strip()
    why = re.sub(r"^\w+(Error|Exception): ", "", last)
    why = re.sub(r" in --config=\.\.\.:\S+?;", ";", why)
    return f"error: --config={_config_spec(argv)}: {why}"
  return f"error: {first}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with `--help` (exit 0) and one-line errors for an unknown or mistyped
  --config.<key>, a missing config file or a failing preset."""
  if any(arg in HELP for arg in argv[1:]):
    print_help()
    sys.exit(0)
  spec = _config_spec(argv)
  if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
    sys.exit(f"error: --config={spec}: no such file")
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(flag_error(str(e), argv))
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    while e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    name, _, hint = str(e.args[0] if e.args else e).partition("\n")
    name = name.strip("'")
    keys = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    key = next((k for k in keys if name in k.split(".")), None)
    if key is None:
      sys.exit(f"error: invalid --config override: {name}")
    sys.exit(f"error: {key}: no such config key. {hint}".strip())
  except OSError as e:  # the config file itself
    sys.exit(f"error: --config: {' '.join(str(e).split())}")


def sweep_seeds() -> list[int]:
  """--sweep_seeds as integers (one error: line when an entry is not one)."""
  try:
    return [int(s) for s in FLAGS.sweep_seeds]
  except ValueError:
    sys.exit(f"error: --sweep_seeds={','.join(FLAGS.sweep_seeds)}: expected integers, e.g. 0,1")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = FLAGS.config
  if FLAGS.print_config:
    print(config_doc.describe(cfg))
    return
  if not FLAGS.workdir:
    sys.exit("error: --workdir: required (the directory for checkpoints, metrics and caches)")
  in_sweep = (FLAGS.sweep or FLAGS.sweep_index is not None or FLAGS.sweep_list or FLAGS.sweep_emit
              or FLAGS.report)
  if FLAGS.sweep_seeds and not in_sweep:
    sys.exit("error: --sweep_seeds: only for a sweep (--sweep, --sweep_index, --sweep_list, "
             "--sweep_emit or --report); a single run takes --config.seed")
  seeds = sweep_seeds()
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  mesh.maybe_initialize_distributed(cfg.distributed)
  logging.set_verbosity(logging.WARNING)
  try:
    if in_sweep:
      if not sweep.main(FLAGS["config"].config_filename, cfg, FLAGS.workdir, argv=sys.argv,
                        index=FLAGS.sweep_index, list_cells=FLAGS.sweep_list,
                        emit=FLAGS.sweep_emit, results=FLAGS.report, seeds=seeds):
        sys.exit(1)
    elif cfg.mode == "eval":
      loop.evaluate_checkpoint(cfg, FLAGS.workdir)
    elif cfg.mode == "generate":
      generate.generate_from_checkpoint(cfg, FLAGS.workdir)
    elif loop.train(cfg, FLAGS.workdir)["status"] == "nonfinite":
      sys.exit(1)
  except (config_lib.ConfigError, checkpoint.NonFiniteStateError,
          checkpoint.CheckpointWriteError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
