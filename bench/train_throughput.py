"""Training throughput and MFU of the real train step on synthetic tokens.

  python -m bench.train_throughput --config=configs/vanilla.py:small [--steps=10] [--config.x=y]

No data pipeline and no checkpoints: random tokens, one document per row (full causal attention),
the model, optimizer and jitted train step of research/train. Prints one JSON line, then a table.
"CPU busy" is CPU-seconds per step over the step time: the cores the step kept busy. Time it on an
otherwise idle machine (docs/benchmarks.md).
"""

import json
import os
import time

import jax
import ml_collections as mlc
from absl import app, flags
from ml_collections import config_flags

from bench.synthetic import compile_train_step, cpu_seconds
from research import config as config_lib
from research.train import flops, peak
from research.train import mesh as mesh_lib

config_flags.DEFINE_config_file("config", "configs/vanilla.py:small", "Experiment config[:preset].",
                                lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
FLAGS = flags.FLAGS


def benchmark(cfg: mlc.ConfigDict, steps: int, warmup: int) -> dict:
  """Times `steps` train steps after compilation and `warmup` steps; returns the figures."""
  config_lib.validate(cfg)
  cfg = config_lib.with_derived(cfg, cfg.data.bpe_vocab_size)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  config_lib.validate_against_devices(cfg, tuple(mesh.shape.values()), jax.process_count())
  total = warmup + steps + 1
  t0 = time.perf_counter()
  train_step, state, batch = compile_train_step(cfg, mesh, total)
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0  # compilation and the first step
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  t0, cpu0 = time.perf_counter(), cpu_seconds()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - t0) / steps
  cpu_per_step = (cpu_seconds() - cpu0) / steps

  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  flops_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
  peak_flops, peak_source = peak.peak_flops_per_device()
  # Simulated CPU devices share one host, whose whole peak the probe measured.
  devices = jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
  achieved = tokens_per_step * flops_per_token / step_time
  return {
      "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
      "flops_per_token": flops_per_token, "achieved_flops": achieved,
      "peak_flops": peak_flops * devices, "peak_source": peak_source,
      "mfu": achieved / (peak_flops * devices), "compile_s": compile_s,
      "cpu_s_per_step": cpu_per_step, "cores": os.cpu_count(),
      "loss": float(metrics["loss"]), "backend": jax.default_backend(),
      "devices": jax.device_count(), "batch_size": cfg.train.batch_size,
      "seq_len": cfg.data.seq_len,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = {"config": flags.FLAGS["config"].config_filename, **benchmark(
      FLAGS.config, FLAGS.steps, FLAGS.warmup)}
  print(json.dumps(result), flush=True)
  rows = [("config", result["config"]), ("batch x seq", f"{result['batch_size']} x "
          f"{result['seq_len']}"), ("step time", f"{result['step_time_s']:.3f} s"),
          ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
          ("FLOPs/token", f"{result['flops_per_token'] / 1e6:.1f} M"),
          ("achieved", f"{result['achieved_flops'] / 1e9:.1f} GFLOP/s"),
          ("peak", f"{result['peak_flops'] / 1e9:.1f} GFLOP/s ({result['peak_source']})"),
          ("MFU", f"{100 * result['mfu']:.1f} %"),
          ("CPU busy", f"{result['cpu_s_per_step'] / result['step_time_s']:.2f} cores "
           f"(of {result['cores']})")]
  for name, value in rows:
    print(f"{name:>12}  {value}")


if __name__ == "__main__":
  app.run(main)
