"""Train-step time of the MoR variants against the recursive and the vanilla model, one run.

  python -m bench.mor_train_throughput [--preset=small] [--seq_len=1024] [--batch=4] [--nr=3]
      [--steps=8] [--json=PATH] [--set=model.d_model=64 ...]

Five models of the same unrolled depth L = configs/mor.py's mor_depth(preset layers, Nr):
vanilla (L untied layers), recursive (middle-cycle, Nr recursions, no routing) and three MoR
variants of that recursion, gathered path: `mor` expert choice with recursion-wise caching,
capacities (Nr - r + 1) / Nr; `mor_token` token choice in its exact mode (capacity_factor 0, the
steps in static buckets: mor.exact_step); `mor_share` expert choice with KV sharing. `--models`
picks a subset (vanilla always runs: the ratios are over it). Each real train step
(research/train/step.py) is jitted and compiled once, then the steps run round-robin (vanilla,
recursive, mor, ..., vanilla, ...) in this one process so that machine noise hits all alike.
Step time: a model's median over `--steps` rounds; measured ratio: the median over rounds of the
ratio within a round. "cores busy" is CPU-seconds per step over the step time (2 on an idle
2-core machine; near 1 when another job takes a core). Random tokens, one document per row.

Analytic ratios, each MoR (or recursive) over vanilla:
  exact     research/train/flops.py train_flops_per_token: every matmul incl. head and routers,
            causal attention at its useful half over the tokens of each step;
  compiled  XLA's FLOP count of the compiled train step (cost_analysis): what the program really
            executes, e.g. masked attention scores (the diagonal blocks), elementwise ops;
  paper     flops.py paper_flops_per_token (MoR App. D: forward, no head, K/V as d x d).
The gap is measured / exact - 1. Exact token choice runs a data-dependent number of tokens per
step, so its "exact" uses the tokens each step needed in the last timed step (those of depth >=
r, from the metric mor/depth_frac), and "bucketed" the slots its steps ran on (mor/computed_frac:
the bucket of the fullest row); for the other models both equal "exact".

--pieces also times, at each MoR step's token count k_r, the forward + backward of one block and
of its two halves (attention sublayer with its projections, SwiGLU): how a step's cost scales
with its tokens (min over `--steps` runs each).
"""

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags
from flax import nnx

from bench.synthetic import compile_train_step, cpu_seconds, parse_flags, parse_overrides, run
from configs import mor as mor_configs
from configs import vanilla as vanilla_configs
from research import config as config_lib
from research import routing
from research.model import mor as mor_lib
from research.model.layers import Block, Tokens
from research.model.lm import resolve_dtype
from research.train import flops
from research.train import mesh as mesh_lib

MODELS = ("vanilla", "recursive", "mor", "mor_token", "mor_share")
DESIGNS = {"vanilla": None, "recursive": ("none", "cache"), "mor": ("expert", "cache"),
           "mor_token": ("token", "cache"), "mor_share": ("expert", "share")}

FLAGS = flags.FlagValues()  # this bench's own flags: benches share no names in one process
flags.DEFINE_string("preset", "small", "Shape preset of configs/presets.py.", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 1024, "Tokens per row T.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 4, "Rows per step.", flag_values=FLAGS)
flags.DEFINE_integer("nr", 3, "Recursions Nr (middle-cycle).", flag_values=FLAGS)
flags.DEFINE_integer("steps", 8, "Timed round-robin rounds (one step of each model per round).",
                     flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "Untimed rounds after compilation.", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "dotted.key=value applied to all three configs.",
                          flag_values=FLAGS)
flags.DEFINE_bool("pieces", False, "Also time a block and its halves at each step's tokens.",
                  flag_values=FLAGS)
flags.DEFINE_list("models", list(MODELS), f"Models to time, of {MODELS} (vanilla always).",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the result to this JSON file.", flag_values=FLAGS)


def apply_overrides(cfg: mlc.ConfigDict, overrides: dict[str, Any]) -> None:
  """cfg[dotted key] = value for each override."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value


def make_configs(preset: str, seq_len: int, batch: int, nr: int,
                 overrides: dict[str, Any] | None = None,
                 models: tuple[str, ...] = MODELS) -> dict[str, mlc.ConfigDict]:
  """Configs of `models` (and vanilla) at the same unrolled depth, validated, derived."""
  unknown = set(models) - set(MODELS)
  if unknown:
    raise app.UsageError(f"--models: unknown {sorted(unknown)}; expected some of {MODELS}")
  cfgs = {}
  for name in (n for n in MODELS if n == "vanilla" or n in models):
    c = vanilla_configs.get_config(preset)
    c.model.num_layers = mor_configs.mor_depth(c.model.num_layers, nr)
    if DESIGNS[name] is not None:
      kind, kv = DESIGNS[name]
      mor_configs.set_design(c, kind, nr)
      c.model.mor.kv = kv
    c.data.seq_len, c.train.batch_size, c.train.grad_accum = seq_len, batch, 1
    apply_overrides(c, overrides or {})
    config_lib.validate(c)
    cfgs[name] = config_lib.with_derived(c, c.data.bpe_vocab_size)
  return cfgs


def compile_step(cfg: mlc.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> tuple[jax.stages.Compiled, dict[str, Any], dict[str, jax.Array], float]:
  """(jitted train step, its initial state, a batch, XLA's FLOPs of one step)."""
  compiled, state, batch = compile_train_step(cfg, mesh)
  return compiled, state, batch, float(compiled.cost_analysis()["flops"])


def min_seconds(fn: Callable, *args, repeats: int) -> float:
  """Fastest of `repeats` calls of fn(*args) after one untimed call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def time_pieces(cfg: mlc.ConfigDict, repeats: int) -> list[dict[str, Any]]:
  """Forward + backward seconds of one block, its attention sublayer and its SwiGLU on the k_r
  tokens of each MoR step (one document per row)."""
  m, b = cfg.model, cfg.train.batch_size
  dtype = resolve_dtype(m.compute_dtype)
  with nnx.use_eager_sharding(False):
    block = Block(m, dtype=dtype, param_dtype=jnp.dtype(m.param_dtype), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(block)
  parts = {"block_s": lambda blk, x, tok: blk(x, tok),
           "attention_s": lambda blk, x, tok: blk.attn(blk.attn_norm(x), tok),
           "swiglu_s": lambda blk, x, tok: blk.ffn(blk.ffn_norm(x))}
  grads = {}
  for name, part in parts.items():
    def loss(p, x, tok, part=part):
      return jnp.sum(part(nnx.merge(graphdef, p), x, tok).astype(jnp.float32) ** 2)
    grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
  rows = []
  for n in routing.tokens_per_step(mor_lib.capacities(m), cfg.data.seq_len):
    idx_BN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    tok = Tokens(idx_BN, jnp.ones((b, n), jnp.int32), idx_BN)
    x_BND = jax.random.normal(jax.random.key(0), (b, n, m.d_model), dtype)
    row = {"tokens": n}
    for name, grad in grads.items():
      row[name] = min_seconds(grad, params, x_BND, tok, repeats=repeats)
    rows.append(row)
  return rows


def step_tokens(metrics: dict[str, Any], seq_len: int) -> tuple[tuple[float, ...] | None, ...]:
  """(tokens per row each MoR step needed, slots it ran on) from a token-choice train step's
  metrics: T * the share of real tokens of depth >= r, and T * mor/computed_frac; (None, None)
  for the other models (flops.py's count is what they run)."""
  if "mor/computed_frac" not in metrics:
    return None, None
  depth_frac = np.asarray(metrics["mor/depth_frac"], np.float64)  # [Nr + 1]: depth 0..Nr
  needed = tuple(float(seq_len * depth_frac[r + 1:].sum()) for r in range(len(depth_frac) - 1))
  ran = tuple(float(seq_len * f) for f in np.asarray(metrics["mor/computed_frac"]))
  return needed, ran


def benchmark(preset: str = "small", seq_len: int = 1024, batch: int = 4, nr: int = 3,
              steps: int = 8, warmup: int = 1, overrides: dict[str, Any] | None = None,
              pieces: bool = False, models: tuple[str, ...] = MODELS) -> dict[str, Any]:
  """Compiles the train steps, times them round-robin; returns times and ratios."""
  cfgs = make_configs(preset, seq_len, batch, nr, overrides, models)
  names = list(cfgs)
  mesh = mesh_lib.make_mesh(cfgs["vanilla"].mesh)
  runs, compile_s, compiled_flops, last = {}, {}, {}, {}
  for name, cfg in cfgs.items():
    t0 = time.perf_counter()
    runs[name] = list(compile_step(cfg, mesh))
    compiled_flops[name] = runs[name].pop()
    compile_s[name] = time.perf_counter() - t0
  times, busy = {name: [] for name in names}, {name: [] for name in names}
  for i in range(warmup + steps):
    for name in names:
      fn, state, data = runs[name]
      t0, cpu0 = time.perf_counter(), cpu_seconds()
      state, metrics = fn(state, data)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times[name].append(time.perf_counter() - t0)
        busy[name].append((cpu_seconds() - cpu0) / times[name][-1])
      runs[name][1], last[name] = state, metrics
  exact, bucketed, tokens = {}, {}, {}
  for n, c in cfgs.items():
    needed, ran = tokens[n] = step_tokens(last[n], seq_len)
    exact[n] = flops.train_flops_per_token(c.model, seq_len, needed)
    bucketed[n] = flops.train_flops_per_token(c.model, seq_len, ran)
  paper = {n: flops.paper_flops_per_token(c.model, seq_len) for n, c in cfgs.items()}
  median = {n: statistics.median(ts) for n, ts in times.items()}
  bases = [b for b in ("vanilla", "recursive") if b in cfgs]
  rows = []
  for name in names:
    ratio = {}
    for base in bases:
      per_round = [a / b for a, b in zip(times[name], times[base], strict=True)]
      ratio[base] = {
          "measured": statistics.median(per_round),
          "per_round_min": min(per_round), "per_round_max": max(per_round),
          "exact": exact[name] / exact[base], "bucketed": bucketed[name] / bucketed[base],
          "compiled": compiled_flops[name] / compiled_flops[base],
          "paper": paper[name] / paper[base],
      }
      ratio[base]["gap"] = ratio[base]["measured"] / ratio[base]["exact"] - 1
    rows.append({
        "model": name, "step_s": median[name], "step_s_min": min(times[name]),
        "step_s_max": max(times[name]), "times_s": times[name],
        "cores_busy": busy[name], "compile_s": compile_s[name],
        "exact_flops_per_token": exact[name], "bucketed_flops_per_token": bucketed[name],
        "step_tokens_needed": tokens[name][0], "step_tokens_ran": tokens[name][1],
        "exact_buckets": cfgs[name].model.mor.token.exact_buckets,
        "paper_flops_per_token": paper[name],
        "compiled_flops_per_step": compiled_flops[name], "ratio": ratio,
    })
  m = cfgs[names[-1]].model
  mor_cfg = cfgs.get("mor")
  extra = {"pieces": time_pieces(mor_cfg, steps)} if pieces and mor_cfg is not None else {}
  return {
      "preset": preset, "seq_len": seq_len, "batch": batch, "nr": nr, "steps": steps,
      "warmup": warmup, "overrides": overrides or {}, "num_layers": m.num_layers,
      "d_model": m.d_model, "vocab_size": m.vocab_size, "backend": jax.default_backend(),
      "rows": rows, **extra,
  }


def format_table(result: dict[str, Any]) -> str:
  """Markdown table: step time, then per baseline the measured / exact / compiled / paper ratios
  and the gap of measured to exact."""
  bases = list(result["rows"][0]["ratio"])
  head = ["model", "step time (min-max)", "cores busy"]
  for base in bases:
    head += [f"/{base} measured (rounds min-max)", "exact", "bucketed", "compiled", "paper",
             "gap"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row in result["rows"]:
    cells = [row["model"], f"{row['step_s']:.3f} s ({row['step_s_min']:.3f}-"
             f"{row['step_s_max']:.3f})", f"{statistics.median(row['cores_busy']):.2f}"]
    for base in bases:
      r = row["ratio"][base]
      cells += [f"{r['measured']:.3f} ({r['per_round_min']:.3f}-{r['per_round_max']:.3f})",
                f"{r['exact']:.3f}", f"{r['bucketed']:.3f}", f"{r['compiled']:.3f}",
                f"{r['paper']:.3f}", f"{100 * r['gap']:+.1f} %"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str], out: Callable[[str], Any] = print) -> None:
  """Runs the benchmark from the flags; `out` receives the printed lines."""
  parse_flags(FLAGS, argv)
  result = benchmark(FLAGS.preset, FLAGS.seq_len, FLAGS.batch, FLAGS.nr, FLAGS.steps,
                     FLAGS.warmup, parse_overrides(FLAGS.set), FLAGS.pieces,
                     tuple(FLAGS.models))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
  out(f"{result['preset']}: L={result['num_layers']} d={result['d_model']} "
        f"vocab={result['vocab_size']} batch x T = {result['batch']} x {result['seq_len']}, "
        f"Nr={result['nr']}, {result['steps']} rounds ({result['backend']})")
  out(format_table(result))
  for p in result.get("pieces", []):
    out(f"{p['tokens']:>6} tokens: block {p['block_s']:.3f} s = attention {p['attention_s']:.3f}"
        f" s + SwiGLU {p['swiglu_s']:.3f} s (+ residuals); forward + backward")


if __name__ == "__main__":
  run(main)
