"""The only entry point: train, resume, evaluate or sample from a model described by a config file.

  python launch.py --config=configs/vanilla.py:tiny --workdir=runs/tiny [--config.key=value ...]
  ... --config.mode=eval        validation NLL of the workdir's newest checkpoint
  ... --config.mode=generate    continue config.generate.prompt with it (docs/inference.md)

Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT with a checkpoint; 1 with a
one-line "error: ..." for a bad config, data or checkpoint, or a non-finite stop; 130 when a
second signal aborted it.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from research import config as config_lib
from research import sweep
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
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a one-line error for an unknown --config.<key> or config file."""
  try:
    return app.parse_flags_with_usage(argv)
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = FLAGS.config
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  mesh.maybe_initialize_distributed(cfg.distributed)
  logging.set_verbosity(logging.WARNING)
  try:
    if (FLAGS.sweep or FLAGS.sweep_index is not None or FLAGS.sweep_list or FLAGS.sweep_emit
        or FLAGS.report):
      if not sweep.main(FLAGS["config"].config_filename, cfg, FLAGS.workdir, argv=sys.argv,
                        index=FLAGS.sweep_index, list_cells=FLAGS.sweep_list,
                        emit=FLAGS.sweep_emit, results=FLAGS.report):
        sys.exit(1)
    elif cfg.mode == "eval":
      loop.evaluate_checkpoint(cfg, FLAGS.workdir)
    elif cfg.mode == "generate":
      generate.generate_from_checkpoint(cfg, FLAGS.workdir)
    elif loop.train(cfg, FLAGS.workdir)["status"] == "nonfinite":
      sys.exit(1)
  except (config_lib.ConfigError, checkpoint.NonFiniteStateError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
