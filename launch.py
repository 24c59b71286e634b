"""The only entry point: train, resume or evaluate a model described by a config file.

  python launch.py --config=configs/vanilla.py:tiny --workdir=runs/tiny [--config.key=value ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from research import config as config_lib
from research.train import loop, mesh

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


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
    if cfg.mode == "eval":
      loop.evaluate_checkpoint(cfg, FLAGS.workdir)
    else:
      loop.train(cfg, FLAGS.workdir)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
