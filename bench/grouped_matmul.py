"""Grouped matmul: the Pallas kernel vs jax.lax.ragged_dot vs dense baselines (docs/kernels.md).

  python -m bench.grouped_matmul [--rows=8192 --k=1024 --n=2048 --groups=8 --dtype=bfloat16]

lhs [rows, k] sorted by group (sizes drawn as a top-k router would: multinomial over groups),
rhs [groups, k, n]. Times the forward and the forward + backward (d lhs, d rhs) of
- pallas: research/kernels/grouped_matmul.py (through research/kernels/dispatch.py),
- xla: jax.lax.ragged_dot,
- masked: every group's weight on every row, masked to the row's group (ragged_dot's CPU lowering;
  groups x the useful FLOPs),
- dense: one [rows, k] @ [k, n] matmul, the useful FLOPs with no grouping (a speed-of-light line),
in one run, and prints one JSON line, then a table of times and ratios to xla.

On CPU the kernel can only run in interpret mode, which is NOT a performance measurement: there
the shape is replaced by a tiny one and the run only checks that everything executes.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from research.kernels import dispatch

flags.DEFINE_integer("rows", 8192, "M: routed token copies (tokens x top_k).")
flags.DEFINE_integer("k", 1024, "K: contraction size (d_model for gate/up).")
flags.DEFINE_integer("n", 2048, "N: output size (expert d_ff for gate/up).")
flags.DEFINE_integer("groups", 8, "G: experts.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype.")
flags.DEFINE_integer("steps", 20, "Timed calls per variant (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
flags.DEFINE_integer("seed", 0, "Seed of the operands and group sizes.")
FLAGS = flags.FLAGS

CPU_SHAPE = dict(rows=256, k=64, n=128, groups=4)


def masked_all_groups(lhs_MK, rhs_GKN, sizes_G):
  """Every group's weight on every row, then each row keeps its own group's result."""
  group_M = jnp.searchsorted(jnp.cumsum(sizes_G), jnp.arange(lhs_MK.shape[0]), side="right")
  y_GMN = jnp.einsum("mk,gkn->gmn", lhs_MK, rhs_GKN, preferred_element_type=jnp.float32)
  one_hot_GM = jax.nn.one_hot(group_M, rhs_GKN.shape[0], axis=0, dtype=y_GMN.dtype)
  return jnp.einsum("gm,gmn->mn", one_hot_GM, y_GMN).astype(lhs_MK.dtype)


def dense(lhs_MK, rhs_GKN, sizes_G):
  """One dense matmul with group 0's weight: the useful FLOPs, no grouping."""
  del sizes_G
  return lhs_MK @ rhs_GKN[0]


def median_seconds(fn, args, steps: int, warmup: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `steps` calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def benchmark(rows: int, k: int, n: int, groups: int, dtype: str, steps: int, warmup: int,
              seed: int) -> dict:
  """Times every variant's forward and forward + backward at one shape; returns the figures."""
  rng = np.random.default_rng(seed)
  sizes_G = jnp.asarray(rng.multinomial(rows, np.full(groups, 1.0 / groups)), jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs_MK = jax.random.normal(k1, (rows, k), dtype)
  rhs_GKN = jax.random.normal(k2, (groups, k, n), dtype) / np.sqrt(k)
  variants = {"pallas": dispatch.grouped_matmul_fn("pallas"), "xla": jax.lax.ragged_dot,
              "masked": masked_all_groups, "dense": dense}
  out = {}
  for name, gmm in variants.items():
    fwd = jax.jit(gmm)

    def loss(lhs_MK, rhs_GKN, sizes_G, gmm=gmm):
      return jnp.sum(gmm(lhs_MK, rhs_GKN, sizes_G).astype(jnp.float32))

    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for kind, fn in (("fwd", fwd), ("fwd_bwd", bwd)):
      first, median = median_seconds(fn, (lhs_MK, rhs_GKN, sizes_G), steps, warmup)
      out[f"{name}_{kind}_s"], out[f"{name}_{kind}_first_s"] = median, first
  useful = 2 * rows * k * n
  out["pallas_fwd_tflops"] = useful / out["pallas_fwd_s"] / 1e12
  out["xla_fwd_tflops"] = useful / out["xla_fwd_s"] / 1e12
  return dict(out, rows=rows, k=k, n=n, groups=groups, dtype=dtype,
              group_sizes=[int(s) for s in sizes_G], backend=jax.default_backend(),
              device=jax.devices()[0].device_kind, interpret=dispatch.interpret())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shape = dict(rows=FLAGS.rows, k=FLAGS.k, n=FLAGS.n, groups=FLAGS.groups)
  if dispatch.interpret():
    print(f"backend {jax.default_backend()}: the Pallas kernel runs in INTERPRET mode, which is "
          f"not a performance measurement; timing the tiny shape {CPU_SHAPE} only to check that "
          "every variant runs. Run on a GPU or TPU for numbers.", flush=True)
    shape = CPU_SHAPE
  result = benchmark(**shape, dtype=FLAGS.dtype, steps=FLAGS.steps, warmup=FLAGS.warmup,
                     seed=FLAGS.seed)
  print(json.dumps(result), flush=True)
  print(f"{result['device']} ({result['backend']}), rows={result['rows']} k={result['k']} "
        f"n={result['n']} groups={result['groups']} {result['dtype']}"
        + (" [interpret mode: not a measurement]" if result["interpret"] else ""))
  print(f"{'variant':>8}  {'fwd ms':>9}  {'fwd/xla':>7}  {'fwd+bwd ms':>10}  {'f+b/xla':>7}")
  for name in ("pallas", "xla", "masked", "dense"):
    f, fb = result[f"{name}_fwd_s"], result[f"{name}_fwd_bwd_s"]
    print(f"{name:>8}  {1e3 * f:9.3f}  {f / result['xla_fwd_s']:7.2f}  {1e3 * fb:10.3f}  "
          f"{fb / result['xla_fwd_bwd_s']:7.2f}")


if __name__ == "__main__":
  app.run(main)
