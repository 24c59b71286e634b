"""Kernel benchmarks (docs/kernels.md): grouped matmul and routed attention against their XLA
baselines, in TFLOP/s and as a fraction of the device's bf16 peak (research/train/peak.py).

  python -m bench.kernels [--json=PATH] [--only=gmm|attention] [--steps=10]

Grouped matmul, lhs [rows, k] sorted by group (sizes drawn as a router would: multinomial over
experts), rhs [experts, k, n]; forward and forward + backward (d lhs, d rhs) of
- pallas: research/kernels/grouped_matmul.py through research/kernels/dispatch.py,
- legacy: the previous tiling (one program per (row tile, n tile) looping over its groups, the
  weight block (G, K, tn)), forward only,
- tiled: research/kernels/tiled_grouped_matmul.py, the same tiling in plain XLA (the CPU default),
- ragged_dot: jax.lax.ragged_dot (the "xla" implementation),
- dense_all: every expert on every row, masked to the row's expert (experts x the FLOPs).
Useful FLOPs: 2 rows k n forward, 3x that forward + backward; TFLOP/s = useful / time for every
variant, so the figures compare directly.

Routed attention at T tokens per row with a fraction routed (a sorted random subset, as MoR's
expert choice gives), causal, one segment per row; forward and forward + backward (d q, k, v):
- pattern "subset": the routed tokens attend to each other (MoR recursion-wise caching);
  pallas: gather + research/kernels/routed_attention.py; gather_xla: gather + the XLA path
  (block-causal, research/kernels/xla_attention.py; the model's path today); masked_full: all T
  tokens, the unrouted ones masked as padding (T x T work, MoR's impl=masked).
- pattern "full_keys": the routed queries against every key (MoR KV sharing); pallas and
  gather_xla (masked einsum over the full keys).
Useful FLOPs: 4 H Dh per readable (query, key) pair forward, 3x that forward + backward.

Prints one JSON object (also written to --json) and a table. On CPU the Pallas kernels run in
interpret mode, which measures NOTHING: there the shapes are replaced by tiny ones and the run only
checks that every variant executes. `--gmm_variants` without pallas and legacy (for example
`--only=gmm --gmm_variants=tiled,ragged_dot,dense_all`) keeps the given shapes on CPU: every
variant then runs compiled, and the grouped matmul figures are measurements.
"""

import functools
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.legacy_grouped_matmul import legacy_grouped_matmul
from research.kernels import dispatch, xla_attention
from research.train import peak

flags.DEFINE_string("json", "", "Also write the JSON result to this path.")
flags.DEFINE_enum("only", "", ["", "gmm", "attention"], "Run one kernel's section only.")
flags.DEFINE_integer("experts", 8, "Grouped matmul: experts G.")
flags.DEFINE_integer("rows", 32768, "Grouped matmul: rows M (routed token copies).")
flags.DEFINE_integer("k", 4096, "Grouped matmul: contraction K (d_model).")
flags.DEFINE_integer("n", 14336, "Grouped matmul: output N (expert d_ff).")
flags.DEFINE_integer("batch", 4, "Attention: rows B.")
flags.DEFINE_integer("seq", 4096, "Attention: tokens per row T.")
flags.DEFINE_float("routed", 1 / 3, "Attention: fraction of the tokens routed.")
flags.DEFINE_integer("heads", 16, "Attention: query heads H.")
flags.DEFINE_integer("kv_heads", 4, "Attention: kv heads K.")
flags.DEFINE_integer("head_dim", 128, "Attention: head width Dh.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype.")
flags.DEFINE_integer("steps", 10, "Timed calls per variant (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.DEFINE_integer("seed", 0, "Seed of the operands, group sizes and routed subsets.")
flags.DEFINE_list("gmm_variants", ["pallas", "legacy", "tiled", "ragged_dot", "dense_all"],
                  "Grouped matmul variants to time.")
FLAGS = flags.FLAGS

CPU_GMM = dict(experts=4, rows=96, k=64, n=128)
CPU_ATTENTION = dict(batch=1, seq=64, routed=1 / 3, heads=2, kv_heads=1, head_dim=16)


# ----------------------------------------------------------------------------------------------
# Grouped matmul variants.


def dense_all(lhs_MK, rhs_GKN, sizes_G):
  """Every expert's weight on every row, then each row keeps its own expert's result."""
  group_M = jnp.searchsorted(jnp.cumsum(sizes_G), jnp.arange(lhs_MK.shape[0]), side="right")
  y_GMN = jnp.einsum("mk,gkn->gmn", lhs_MK, rhs_GKN)
  one_hot_GM = jax.nn.one_hot(group_M, rhs_GKN.shape[0], axis=0, dtype=y_GMN.dtype)
  return jnp.einsum("gm,gmn->mn", one_hot_GM, y_GMN)


# ----------------------------------------------------------------------------------------------
# Timing.


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


def _fwd_and_grad(fn, argnums):
  """(jit(fn), jit(grad of sum(fn) w.r.t. argnums))."""
  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32))
  return jax.jit(fn), jax.jit(jax.grad(loss, argnums=argnums))


def _records(kernel: str, pattern: str, variants: dict, args, argnums, useful_fwd: float,
             steps: int, warmup: int, peak_flops: float) -> list[dict]:
  out = []
  for name, (fn, with_grad) in variants.items():
    fwd, grad = _fwd_and_grad(fn, argnums)
    for kind, f, mult in (("fwd", fwd, 1), ("fwd_bwd", grad, 3)):
      if kind == "fwd_bwd" and not with_grad:
        continue
      record = {"kernel": kernel, "pattern": pattern, "variant": name, "pass": kind}
      try:
        first, seconds = median_seconds(f, args, steps, warmup)
      except Exception as e:  # one failing variant must not end the run
        out.append(dict(record, error=f"{type(e).__name__}: {e}"[:2000]))
        print(f"  {kernel} {pattern} {name} {kind}: FAILED {out[-1]['error'][:300]}", flush=True)
        continue
      tflops = mult * useful_fwd / seconds / 1e12
      out.append(dict(record, seconds=seconds, first_call_s=first, tflops=tflops,
                      peak_fraction=tflops * 1e12 / peak_flops))
      print(f"  {kernel} {pattern} {name} {kind}: {1e3 * seconds:.3f} ms", flush=True)
  return out


GMM_INTERPRETED = ("pallas", "legacy")  # the variants that only interpret on CPU


def bench_gmm(experts: int, rows: int, k: int, n: int, dtype, steps: int, warmup: int,
              seed: int, peak_flops: float, names: Sequence[str] | None = None
              ) -> tuple[dict, list[dict]]:
  """(shape, records) of the grouped matmul variants `names` (default all)."""
  rng = np.random.default_rng(seed)
  sizes_G = jnp.asarray(rng.multinomial(rows, np.full(experts, 1.0 / experts)), jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs_MK = jax.random.normal(k1, (rows, k), dtype)
  rhs_GKN = (jax.random.normal(k2, (experts, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  interpret = dispatch.interpret()
  variants = {"pallas": (dispatch.grouped_matmul_fn("pallas"), True),
              "legacy": (functools.partial(legacy_grouped_matmul, interpret=interpret), False),
              "tiled": (dispatch.grouped_matmul_fn("tiled"), True),
              "ragged_dot": (jax.lax.ragged_dot, True), "dense_all": (dense_all, True)}
  unknown = set(names or ()) - set(variants)
  if unknown:
    raise ValueError(f"--gmm_variants: unknown {sorted(unknown)}; choose from {list(variants)}")
  variants = {name: v for name, v in variants.items() if names is None or name in names}
  shape = dict(experts=experts, rows=rows, k=k, n=n, group_sizes=[int(s) for s in sizes_G])
  return shape, _records("gmm", "moe", variants, (lhs_MK, rhs_GKN, sizes_G), (0, 1),
                         2.0 * rows * k * n, steps, warmup, peak_flops)


def bench_attention(batch: int, seq: int, routed: float, heads: int, kv_heads: int,
                    head_dim: int, dtype, steps: int, warmup: int, seed: int,
                    peak_flops: float) -> tuple[dict, list[dict]]:
  b, t, h, kh, dh = batch, seq, heads, kv_heads, head_dim
  r = max(1, round(routed * t))
  rng = np.random.default_rng(seed)
  idx_BR = jnp.asarray(np.sort(np.stack([rng.choice(t, r, replace=False) for _ in range(b)]), 1),
                       jnp.int32)
  ks = jax.random.split(jax.random.key(seed), 3)
  q_BTHD = jax.random.normal(ks[0], (b, t, h, dh), dtype)
  k_BTKD = jax.random.normal(ks[1], (b, t, kh, dh), dtype)
  v_BTKD = jax.random.normal(ks[2], (b, t, kh, dh), dtype)
  pos_BT = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
  ones_BT, ones_BR = jnp.ones((b, t), jnp.int32), jnp.ones((b, r), jnp.int32)
  routed_BT = jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], idx_BR].set(1)
  pallas = dispatch.attention_fn("pallas")

  def gather(x_BTND):
    return jnp.take_along_axis(x_BTND, idx_BR[:, :, None, None], axis=1)

  def subset(attend, q_BTHD, k_BTKD, v_BTKD, **kw):
    return attend(gather(q_BTHD), gather(k_BTKD), gather(v_BTKD), idx_BR, ones_BR, idx_BR,
                  ones_BR, causal=True, cross_segments=False, **kw)

  def full_keys(attend, q_BTHD, k_BTKD, v_BTKD):
    return attend(gather(q_BTHD), k_BTKD, v_BTKD, idx_BR, ones_BR, pos_BT, ones_BT, causal=True,
                  cross_segments=False)

  def masked_full(q_BTHD, k_BTKD, v_BTKD):
    return xla_attention.xla_attention(q_BTHD, k_BTKD, v_BTKD, pos_BT, routed_BT, pos_BT,
                                       routed_BT, causal=True, cross_segments=False)

  args = (q_BTHD, k_BTKD, v_BTKD)
  shape = dict(batch=b, seq=t, routed_tokens=r, heads=h, kv_heads=kh, head_dim=dh)
  # Readable (query, key) pairs: subset: rank + 1 per routed query; full keys: position + 1.
  pairs_subset = b * r * (r + 1) / 2
  pairs_full = float(np.sum(np.asarray(idx_BR) + 1))
  records = _records("attention", "subset", {
      "pallas": (functools.partial(subset, pallas), True),
      "gather_xla": (functools.partial(subset, xla_attention.xla_attention,
                                       sorted_self_attention=True), True),
      "masked_full": (masked_full, True)}, args, (0, 1, 2), 4.0 * h * dh * pairs_subset, steps,
      warmup, peak_flops)
  records += _records("attention", "full_keys", {
      "pallas": (functools.partial(full_keys, pallas), True),
      "gather_xla": (functools.partial(full_keys, xla_attention.xla_attention), True)},
      args, (0, 1, 2), 4.0 * h * dh * pairs_full, steps, warmup, peak_flops)
  return shape, records


def table(result: dict) -> str:
  """The records as a table, with each variant's time over its baseline's (ragged_dot for the
  grouped matmul, gather_xla for attention) at the same pattern and pass."""
  baseline = {"gmm": "ragged_dot", "attention": "gather_xla"}
  times = {(r["kernel"], r["pattern"], r["variant"], r["pass"]): r["seconds"]
           for r in result["records"] if "seconds" in r}
  lines = [f"{'kernel':>9} {'pattern':>9} {'variant':>11} {'pass':>7} {'ms':>10} {'TFLOP/s':>8} "
           f"{'% peak':>7} {'speedup':>7}"]
  for r in result["records"]:
    head = f"{r['kernel']:>9} {r['pattern']:>9} {r['variant']:>11} {r['pass']:>7} "
    if "error" in r:
      lines.append(head + "FAILED: " + r["error"].splitlines()[0][:80])
      continue
    base = times.get((r["kernel"], r["pattern"], baseline[r["kernel"]], r["pass"]))
    lines.append(head + f"{1e3 * r['seconds']:10.3f} {r['tflops']:8.2f} "
                 f"{100 * r['peak_fraction']:7.1f} "
                 + (f"{base / r['seconds']:7.2f}" if base else f"{'-':>7}"))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  interpret = dispatch.interpret()
  gmm_shape = dict(experts=FLAGS.experts, rows=FLAGS.rows, k=FLAGS.k, n=FLAGS.n)
  attn_shape = dict(batch=FLAGS.batch, seq=FLAGS.seq, routed=FLAGS.routed, heads=FLAGS.heads,
                    kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim)
  steps, warmup = FLAGS.steps, FLAGS.warmup
  measures = not set(FLAGS.gmm_variants) & set(GMM_INTERPRETED) and FLAGS.only == "gmm"
  if interpret and not measures:
    print(f"backend {jax.default_backend()}: the Pallas kernels run in INTERPRET mode, which "
          "measures nothing; timing tiny shapes only to check that every variant runs. Run on a "
          "GPU or TPU for numbers.", flush=True)
    gmm_shape, attn_shape, steps, warmup = CPU_GMM, CPU_ATTENTION, min(steps, 2), 0
  peak_flops, peak_source = peak.peak_flops_per_device()
  dtype = jnp.dtype(FLAGS.dtype)
  common = dict(dtype=dtype, steps=steps, warmup=warmup, seed=FLAGS.seed, peak_flops=peak_flops)
  result = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, interpret=interpret and not measures,
                dtype=FLAGS.dtype,
                peak_flops=peak_flops, peak_source=peak_source, steps=steps, records=[])
  if FLAGS.only in ("", "gmm"):
    result["gmm_shape"], records = bench_gmm(**gmm_shape, **common, names=FLAGS.gmm_variants)
    result["records"] += records
  if FLAGS.only in ("", "attention"):
    result["attention_shape"], records = bench_attention(**attn_shape, **common)
    result["records"] += records
  print(json.dumps(result), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
  print(f"{result['device']} ({result['backend']}), jax {result['jax_version']}, {FLAGS.dtype}, "
        f"peak {peak_flops / 1e12:.3g} TFLOP/s ({peak_source})"
        + (" [interpret mode: NOT a measurement]" if result["interpret"] else ""))
  print(table(result))


if __name__ == "__main__":
  app.run(main)
