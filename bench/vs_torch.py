"""Our train step against Hugging Face transformers' LlamaForCausalLM on torch (CPU), one run.

  python -m bench.vs_torch [--quick] [--shapes=8x256,4x1024,small] [--variants=vanilla,recursive]
      [--rounds=7] [--threads=2] [--json=PATH] [--nocompile]
  python -m bench.vs_torch --ours_only [--dtype=bfloat16]   # our side alone, e.g. on a GPU
  python -m bench.vs_torch --shapes=8x256 --matmuls    # also each projection's matmul alone

Needs torch and transformers: pip install -r requirements-bench.txt (the CPU torch wheel).
`--ours_only` needs neither: it times our step alone at the same shapes and reports its MFU
(research/train/flops.py over research/train/peak.py's peak: data-sheet bf16 on accelerators).

Both sides train the same model at the same shapes and init scale: a Llama decoder (RMSNorm, RoPE,
GQA, SwiGLU), tied embeddings, float32, every weight N(0, 0.02), fwd + bwd of the token-mean
next-token cross-entropy, global-norm clipping at 1.0 and AdamW (b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1 on matrices only). Ours is the real jitted train step of
research/train/step.py (the model of research/model/lm.py, AdamW of research/train/optimizer.py),
as bench/train_throughput.py runs it. Theirs is LlamaForCausalLM with SDPA attention and
torch.optim.AdamW (fused), eager and under torch.compile (the loss function, model forward and
its backward; the optimizer eager).

Shapes: the issue's tiny config (d 128, d_ff 344, 4 heads / 2 kv heads of 32, 8 layers, vocab 512)
at 8 x 256 and 4 x 1024, and configs/vanilla.py:small at its preset batch 16 x 256. Variants:
vanilla (8 unique layers) and recursive Middle-Cycle Nr = 3 (first and last layers unique, the 6
middle depths cycle over 2 shared layers, `layer_order`); in torch the recursive model is a
4-layer LlamaForCausalLM whose layer list holds the same modules in that order.

Timing: everything compiled first, then `--rounds` rounds (after `--warmup`), each running one
step of ours, torch eager and torch.compile in turn, so that machine noise hits all alike.
ms: a side's median over rounds; speedup: the median over rounds of torch's time / ours within
the round (> 1: ours is faster). torch runs with `--threads` intra-op threads; XLA:CPU uses
every core it sees.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags

from bench.synthetic import compile_train_step, parse_flags, run
from configs import mor as mor_configs
from configs import vanilla as vanilla_configs
from research import config as config_lib
from research.model import recursion
from research.train import flops, peak
from research.train import mesh as mesh_lib

VARIANTS = ("vanilla", "recursive")
SHAPES = ("8x256", "4x1024", "small")
TINY = dict(d_model=128, d_ff=344, num_heads=4, num_kv_heads=2, num_layers=8, vocab_size=512)
MISSING = ("error: bench/vs_torch.py needs torch and transformers: "
           "pip install -r requirements-bench.txt")

FLAGS = flags.FlagValues()  # this bench's own flags: benches share no names in one process
flags.DEFINE_list("shapes", list(SHAPES), f"Shapes among {SHAPES}: BxT of the tiny config, or "
                  "small (configs/vanilla.py:small at 16x256).", flag_values=FLAGS)
flags.DEFINE_list("variants", list(VARIANTS), f"Variants among {VARIANTS}.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 7, "Timed round-robin rounds.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed rounds after compilation.", flag_values=FLAGS)
flags.DEFINE_integer("threads", 2, "torch intra-op threads.", flag_values=FLAGS)
flags.DEFINE_bool("compile", True, "Also time torch.compile.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Smoke run: shape 8x256 only, 2 rounds after 1 warm-up.",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write {'rows': [...]} to this JSON file.", flag_values=FLAGS)
flags.DEFINE_bool("ours_only", False, "Time our step alone (no torch): step ms and MFU.",
                  flag_values=FLAGS)
flags.DEFINE_bool("matmuls", False, "Also time the step's matmul shapes alone: XLA's dot against "
                  "torch.mm, float32, round-robin (where a step's gap starts).", flag_values=FLAGS)
flags.DEFINE_string("dtype", "float32", "Our compute dtype (float32 | bfloat16 | auto).",
                    flag_values=FLAGS)


def bench_config(shape: str, variant: str, compute_dtype: str = "float32") -> mlc.ConfigDict:
  """Our validated, derived config of `variant` at `shape` ("BxT" of the tiny config, or
  "small": configs/vanilla.py:small at its preset 16 x 256)."""
  if shape == "small":
    c = vanilla_configs.get_config("small")
  else:
    batch, seq_len = (int(n) for n in shape.split("x"))
    c = vanilla_configs.get_config("tiny")
    for key, value in TINY.items():
      c.model[key] = value
    c.data.bpe_vocab_size = TINY["vocab_size"]
    c.data.seq_len, c.train.batch_size = seq_len, batch
  c.train.grad_accum = 1
  c.model.compute_dtype = compute_dtype
  c.model.num_layers = mor_configs.mor_depth(c.model.num_layers, 3)
  if variant == "recursive":
    mor_configs.set_design(c, "none", 3)
  elif variant != "vanilla":
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  config_lib.validate(c)
  return config_lib.with_derived(c, c.data.bpe_vocab_size)


def shape_label(cfg: mlc.ConfigDict, shape: str) -> str:
  """The row's shape: "BxT", with "small:" in front for the :small config."""
  bt = f"{cfg.train.batch_size}x{cfg.data.seq_len}"
  return f"small:{bt}" if shape == "small" else bt


def layer_order(m: mlc.ConfigDict) -> list[int]:
  """The unique layer each unrolled depth runs: prelude, the plan's middle order, coda
  (recursion.make_plan); vanilla is 0..L-1, Middle-Cycle Nr = 3 at L = 8 is 0,1,2,1,2,1,2,3."""
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  coda = range(plan.prelude + plan.num_shared, plan.prelude + plan.num_shared + plan.coda)
  return [*range(plan.prelude), *(plan.prelude + j for j in plan.order), *coda]


def param_count(m: mlc.ConfigDict) -> int:
  """Parameters of the tied Llama with U = len(set(layer_order)) unique layers:
  V D + U (D H Dh + 2 D K Dh + H Dh D + 3 D F + 2 D) + D."""
  d, dh, f = m.d_model, m.head_dim, m.d_ff
  layer = d * m.num_heads * dh * 2 + 2 * d * m.num_kv_heads * dh + 3 * d * f + 2 * d
  return m.vocab_size * d + len(set(layer_order(m))) * layer + d


def hf_config_kwargs(m: mlc.ConfigDict) -> dict[str, Any]:
  """LlamaConfig arguments of the same model, with the unique layers only (`layer_order`
  repeats them for a recursive model)."""
  return dict(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
      num_hidden_layers=len(set(layer_order(m))), num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, hidden_act="silu",
      max_position_embeddings=4096, initializer_range=m.init_std, rms_norm_eps=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
      rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, use_cache=False,
      pad_token_id=None, bos_token_id=None, eos_token_id=None)


def import_torch() -> tuple[Any, Any]:
  """(torch, transformers); SystemExit after one `error:` line when either is missing."""
  try:
    import torch
    import transformers
  except ImportError:
    print(MISSING, file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  return torch, transformers


def torch_model(m: mlc.ConfigDict, seed: int = 0):
  """LlamaForCausalLM of `m` (SDPA attention, float32); a recursive model's layer list holds its
  unique modules in `layer_order`."""
  torch, transformers = import_torch()
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**hf_config_kwargs(m))
  config._attn_implementation = "sdpa"
  model = transformers.LlamaForCausalLM(config).float()
  order = layer_order(m)
  if order != list(range(len(order))):
    unique = list(model.model.layers)
    model.model.layers = torch.nn.ModuleList([unique[i] for i in order])
    model.config.num_hidden_layers = len(order)
  return model.train()


def torch_step(m: mlc.ConfigDict, t: mlc.ConfigDict, compiled: bool, seed: int = 0
               ) -> Callable[[Any, Any], float]:
  """step(inputs_BT, targets_BT) -> loss of one torch train step: forward, token-mean
  cross-entropy, backward, global-norm clipping, AdamW (decay on matrices only)."""
  torch, _ = import_torch()
  model = torch_model(m, seed)
  params = list(model.parameters())  # each shared module once
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, fused=True)
  vocab = m.vocab_size

  def loss_fn(inputs_BT, targets_BT):
    logits_BTV = model(input_ids=inputs_BT, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits_BTV.reshape(-1, vocab).float(),
                                             targets_BT.reshape(-1))

  loss_fn = torch.compile(loss_fn) if compiled else loss_fn

  def step(inputs_BT, targets_BT) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(inputs_BT, targets_BT)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    opt.step()
    return float(loss.detach())

  return step


def ours_step(cfg: mlc.ConfigDict) -> Callable[[], None]:
  """step() runs one of our jitted, compiled train steps (research/train/step.py, as
  bench/train_throughput.py builds it) on a fixed random batch, the state donated and kept."""
  compiled, state, batch = compile_train_step(cfg, mesh_lib.make_mesh(cfg.mesh))
  box = [state]

  def step() -> None:
    box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready((box[0], metrics))

  step.compiled = compiled  # for profiles: the HLO behind the op names
  return step


def bench_row(shape: str, variant: str, rounds: int, warmup: int, compile_torch: bool,
              threads: int) -> dict[str, Any]:
  """Builds the three steps of one row, times them round-robin; the row's figures."""
  torch, _ = import_torch()
  torch.set_num_threads(threads)
  cfg = bench_config(shape, variant)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=gen)
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  sides = {"ours": ours_step(cfg)}
  eager = torch_step(cfg.model, cfg.train, compiled=False)
  sides["eager"] = lambda: eager(inputs, targets)
  if compile_torch:
    comp = torch_step(cfg.model, cfg.train, compiled=True)
    sides["compile"] = lambda: comp(inputs, targets)
  setup_s = {}
  for name, fn in sides.items():  # compiles / first calls
    t0 = time.perf_counter()
    fn()
    setup_s[name] = time.perf_counter() - t0
  times = {name: [] for name in sides}
  for i in range(warmup + rounds):
    for name, fn in sides.items():
      t0 = time.perf_counter()
      fn()
      if i >= warmup:
        times[name].append(1e3 * (time.perf_counter() - t0))
  row = {"variant": variant, "shape": shape_label(cfg, shape),
         "ours_ms": statistics.median(times["ours"]),
         "eager_ms": statistics.median(times["eager"]),
         "compile_ms": statistics.median(times["compile"]) if compile_torch else None}
  for name in ("eager", "compile"):
    row[f"speedup_vs_{name}"] = (statistics.median(
        [a / o for a, o in zip(times[name], times["ours"], strict=True)])
        if name in times else None)
  row["times_ms"] = times
  row["setup_s"] = setup_s
  return row


def ours_row(shape: str, variant: str, rounds: int, warmup: int, dtype: str) -> dict[str, Any]:
  """Our step alone at `shape` in `dtype`: median ms over `rounds` and its MFU,
  tokens x train_flops_per_token / step time / the device peak."""
  cfg = bench_config(shape, variant, dtype)
  step = ours_step(cfg)
  times = []
  for i in range(1 + warmup + rounds):
    t0 = time.perf_counter()
    step()
    if i > warmup:
      times.append(1e3 * (time.perf_counter() - t0))
  ms = statistics.median(times)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  peak_flops, source = peak.peak_flops_per_device()
  devices = jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
  mfu = tokens * flops.train_flops_per_token(cfg.model, cfg.data.seq_len) / (ms / 1e3) / (
      peak_flops * devices)
  return {"variant": variant, "shape": shape_label(cfg, shape), "dtype": dtype, "ours_ms": ms,
          "mfu": mfu, "peak_source": source, "backend": jax.default_backend()}


def matmul_shapes(cfg: mlc.ConfigDict) -> list[tuple[str, int, int, int]]:
  """(name, M, K, N) of the distinct float32 products of one train step's projections at
  `cfg`'s batch: the forward x W (tokens x in x out), the input gradient dy W^T (tokens x out x
  in) and the weight gradient x^T dy (in x tokens x out), for q / o, k / v, gate / up, down and
  the tied LM head."""
  m, tokens = cfg.model, cfg.train.batch_size * cfg.data.seq_len
  weights = {"q, o": (m.d_model, m.num_heads * m.head_dim),
             "k, v": (m.d_model, m.num_kv_heads * m.head_dim),
             "gate, up": (m.d_model, m.d_ff), "down": (m.d_ff, m.d_model),
             "head": (m.d_model, m.vocab_size)}
  out, seen = [], set()
  for name, (d_in, d_out) in weights.items():
    for kind, mkn in (("fwd", (tokens, d_in, d_out)), ("dx", (tokens, d_out, d_in)),
                      ("dW", (d_in, tokens, d_out))):
      if mkn not in seen:
        seen.add(mkn)
        out.append((f"{name} {kind}", *mkn))
  return out


def matmul_rows(cfg: mlc.ConfigDict, shape: str, rounds: int, threads: int
                ) -> list[dict[str, Any]]:
  """Each matmul_shapes product timed as XLA's jitted dot and torch.mm (`threads` threads),
  float32, round-robin over `rounds` rounds of 20 calls; GFLOP/s of the medians."""
  torch, _ = import_torch()
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  dot = jax.jit(lambda a, b: a @ b)
  rows = []
  for name, m, k, n in matmul_shapes(cfg):
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    sides = {"xla": lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready(),
             "torch": lambda ta=ta, tb=tb: torch.mm(ta, tb)}
    times = {side: [] for side in sides}
    for i in range(rounds + 1):
      for side, fn in sides.items():
        t0 = time.perf_counter()
        for _ in range(20):
          fn()
        if i:  # the first round compiles and warms up
          times[side].append((time.perf_counter() - t0) / 20)
    gflops = {side: 2 * m * k * n / statistics.median(t) / 1e9 for side, t in times.items()}
    rows.append({"shape": shape_label(cfg, shape), "matmul": name, "m": m, "k": k, "n": n,
                 "xla_gflops": gflops["xla"], "torch_gflops": gflops["torch"],
                 "xla_over_torch": gflops["xla"] / gflops["torch"]})
  return rows


def format_matmuls(rows: list[dict[str, Any]]) -> str:
  lines = ["| shape | matmul | M x K x N | XLA GFLOP/s | torch GFLOP/s | XLA / torch |",
           "|" + " --- |" * 6]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['matmul']} | {r['m']} x {r['k']} x {r['n']} | "
                 f"{r['xla_gflops']:.0f} | {r['torch_gflops']:.0f} | {r['xla_over_torch']:.2f} |")
  return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of the rows: ms of each side and ours' speedups."""
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = ["| variant | shape | ours ms | torch eager ms | torch.compile ms | vs eager | "
           "vs compile |", "|" + " --- |" * 7]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['shape']} | {r['ours_ms']:.1f} | {r['eager_ms']:.1f} | "
                 f"{fmt(r['compile_ms'], '.1f')} | {fmt(r['speedup_vs_eager'], '.2f')}x | "
                 f"{fmt(r['speedup_vs_compile'], '.2f')}x |")
  return "\n".join(lines)


def main(argv: list[str], out: Callable[[str], Any] = print) -> None:
  """Runs every (variant, shape) row from the flags, prints the table, writes --json."""
  parse_flags(FLAGS, argv)
  shapes, rounds, warmup = FLAGS.shapes, FLAGS.rounds, FLAGS.warmup
  if FLAGS.quick:
    shapes, rounds, warmup = ["8x256"], 2, 1
  for s in shapes:
    if s != "small" and (len(s.split("x")) != 2 or not all(n.isdigit() for n in s.split("x"))):
      raise app.UsageError(f"--shapes: {s!r} is neither BxT nor small")
  if FLAGS.ours_only:
    rows = [ours_row(shape, variant, rounds, warmup, FLAGS.dtype) for shape in shapes
            for variant in FLAGS.variants]
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    out("| variant | shape | dtype | ours ms | MFU |\n| --- | --- | --- | --- | --- |")
    for r in rows:
      out(f"| {r['variant']} | {r['shape']} | {r['dtype']} | {r['ours_ms']:.1f} | "
          f"{100 * r['mfu']:.1f} % ({r['backend']}, peak: {r['peak_source']}) |")
    return
  torch, transformers = import_torch()
  out(f"torch {torch.__version__} ({FLAGS.threads} threads), transformers "
      f"{transformers.__version__}, jax {jax.__version__} ({jax.default_backend()}); "
      f"{rounds} rounds after {warmup} warm-up")
  rows = []
  for shape in shapes:
    for variant in FLAGS.variants:
      rows.append(bench_row(shape, variant, rounds, warmup, FLAGS.compile, FLAGS.threads))
      out(format_table(rows[-1:]).splitlines()[-1])
  mm = [r for shape in shapes if FLAGS.matmuls
        for r in matmul_rows(bench_config(shape, "vanilla"), shape, rounds, FLAGS.threads)]
  if FLAGS.json:
    keys = ("variant", "shape", "ours_ms", "eager_ms", "compile_ms", "speedup_vs_eager",
            "speedup_vs_compile")
    result = {"rows": [{k: r[k] for k in keys} for r in rows]}
    if mm:
      result["matmuls"] = mm
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
  out(format_table(rows))
  if mm:
    out(format_matmuls(mm))


if __name__ == "__main__":
  run(main)
