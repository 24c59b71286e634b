"""Decode throughput of MoR against vanilla through the inference engine (MoR paper Fig. 4a).

  python -m bench.inference_throughput [--quick] [--json=PATH] [--train_dir=DIR]
      [--workdir=mor3=DIR ...] [--models=vanilla,mor3] [--requests=N] [--rounds=R] [--edge_ab]

Models, all of one unrolled depth L (`--layers`; L - 2 must divide by each Nr): vanilla (L untied
layers) and middle-cycle MoR-2/3/4 (expert choice, recursion-wise KV caching), MoR-3 with KV
sharing, and a cycle recursive model (Nr = 2, as RRT's default B = 2) trained with one exit per
loop (train.exit_loss aggressive) and served with confidence exits at each `--exit_threshold`
(research/model/early_exit.py; a list gives one row per threshold, `recursive_exit@0.3`, of the
one trained model). Each is trained for `--train_steps`
on the embedded corpus by the real training loop (research/train/loop.py, into
`--train_dir/<model>`, which a rerun resumes, so a second run reuses the checkpoints) or loaded
from `--workdir=<model>=DIR`; its routers then make the decisions they learned (decoding routes
by the causal threshold rule, mor.md §2.5), and the realised mean depth is reported.

The request set is the same for every model: N prompts cut from validation documents (lengths
uniform in [prompt_min, prompt_max]) with generation budgets drawn from a normal distribution
(mean gen_mean, std gen_std, clipped to [gen_min, gen_max]; MoR App. E), no EOS stop, so every
model generates the same tokens count. Batch settings: B = 32 slots, and B = max, the largest slot
count whose KV cache (every buffer of the engine's cache, bytes from its shapes) fits the bytes
of vanilla's cache at B = 32 (the paper's "relative max"). MoR expert choice with kv=cache is
and the early-exit model are served by the depth-wise engine (engine.DepthwiseEngine); a model it
refuses is served by the
sequence-wise engine only where that still batches it honestly (the `engine` column says which),
and a model no engine serves as its method needs is listed as not served, with the reason.

Timing: every engine compiles (every depth-wise edge size, then a warm-up serve), then
`--rounds` rounds each serve the whole request set once per (batch setting, model), round-robin
in this one process; tokens/s is
generated tokens over wall time (host scheduling included), the median over rounds, and speedup is
the median over rounds of the ratio to vanilla's tokens/s at the same batch setting in the same
round; each row's `stats` (the engine's counters) are totals over the timed rounds. Mean depth
is over every token run (prompts and generated tokens; vanilla 1), and for
depth-wise rows also over the generated tokens fed back (block rows / edge rows). Vanilla's and
MoR-3's rows at the fixed B also report where the time goes (prefill / decode, or prefill /
core / exit / entry, and the host's rest), from one extra serve of a profiling engine.

KV bytes per token: `kv_bytes_per_token` is what the cache allocates per slot entry (all its
buffers over slots x max_len); `kv_bytes_per_token_used` the K/V bytes of the entries the served
tokens filled (prelude + coda layers, and per core depth the tokens that ran it: the realised
depths); `kv_bytes_per_token_analytic` the recursion-wise figure from the capacities,
(prelude + coda + num_shared x sum_r c_r) layers of K/V per token (vanilla: L).
"""

import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging

from bench.synthetic import parse_flags, parse_overrides, run
from configs import mor as mor_configs
from configs import vanilla as vanilla_configs
from research import config as config_lib
from research.analysis import routing as routing_analysis
from research.infer import engine as engine_lib
from research.train import loop

# name -> (mor.kind, Nr, mor.kv, early exit)
MODELS = {
    "vanilla": ("none", 1, "cache", False),
    "mor2": ("expert", 2, "cache", False),
    "mor3": ("expert", 3, "cache", False),
    "mor4": ("expert", 4, "cache", False),
    "mor3_share": ("expert", 3, "share", False),
    "recursive_exit": ("none", 2, "cache", True),  # cycle, confidence exits
}

FULL = dict(layers=14, train_steps=100, requests=128, rounds=2, prompt_min=16, prompt_max=32,
            gen_mean=64.0, gen_std=16.0, gen_min=16, gen_max=112)
QUICK = dict(layers=8, train_steps=30, requests=80, rounds=1, prompt_min=8, prompt_max=24,
             gen_mean=24.0, gen_std=8.0, gen_min=4, gen_max=40)

FLAGS = flags.FlagValues()  # this bench's own flags: benches share no names in one process
flags.DEFINE_bool("quick", False, "A small version (under 5 minutes on 2 CPU cores).",
                  flag_values=FLAGS)
flags.DEFINE_list("models", list(MODELS), "Models to run (vanilla is always run).",
                  flag_values=FLAGS)
flags.DEFINE_multi_string("workdir", [], "MODEL=DIR: load MODEL from this run instead of "
                          "training it (its newest checkpoint and saved config).",
                          flag_values=FLAGS)
flags.DEFINE_string("train_dir", "", "Where models are trained (<dir>/<model>); a rerun resumes "
                    "them ('': a temporary directory).", flag_values=FLAGS)
flags.DEFINE_integer("layers", None, "Unrolled depth L (default: 14, quick 8).", flag_values=FLAGS)
flags.DEFINE_integer("train_steps", None, "Training steps per model (default: 100, quick 30).",
                     flag_values=FLAGS)
flags.DEFINE_integer("requests", None, "Requests N (default: 128, quick 80).", flag_values=FLAGS)
flags.DEFINE_integer("rounds", None, "Timed round-robin rounds (default: 2, quick 1).",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "The fixed batch setting B (slots).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the request set.", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "dotted.key=value applied to every model's config.",
                          flag_values=FLAGS)
flags.DEFINE_list("exit_threshold", ["0.5"], "recursive_exit: a token stops after a loop whose "
                  "exit puts at least this softmax probability on one token; a list serves the "
                  "one trained model once per threshold (rows recursive_exit@TAU).",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the result to this JSON file.", flag_values=FLAGS)
flags.DEFINE_bool("edge_ab", False, "Also time each depth-wise model at the fixed B with one "
                  "compiled edge size: all B slots, and ceil(B / sum_r c_r) (the expected exits "
                  "per step at the capacities); against the per-step choice of the default.",
                  flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run's sizes (FULL or QUICK, with flag overrides)."""

  layers: int
  train_steps: int
  requests: int
  rounds: int
  prompt_min: int
  prompt_max: int
  gen_mean: float
  gen_std: float
  gen_min: int
  gen_max: int

  @property
  def max_len(self) -> int:
    """Cache entries per slot: the longest prompt plus the longest generation."""
    return self.prompt_max + self.gen_max

  @property
  def buckets(self) -> tuple[int, ...]:
    """Prefill lengths: powers of two from the one below prompt_min (at least 8) up to the first
    one holding prompt_max."""
    out = [max(8, 2 ** int(math.log2(self.prompt_min)))]
    while out[-1] < self.prompt_max:
      out.append(2 * out[-1])
    return tuple(b for b in out if b <= self.max_len)


def make_config(name: str, layers: int, train_steps: int, cache_dir: str,
                overrides: dict[str, Any] | None = None, exit_threshold: float = 0.5
                ) -> mlc.ConfigDict:
  """The tiny-shaped config of bench model `name` at unrolled depth `layers`, trained for
  `train_steps` (batch 16 x 128, evaluation only at the end, one checkpoint), validated; the
  early-exit model decodes with `exit_threshold`."""
  kind, nr, kv, early_exit = MODELS[name]
  c = vanilla_configs.get_config("tiny")
  c.model.num_layers = layers
  if nr > 1:
    mor_configs.set_design(c, kind, nr)
    c.model.mor.kv = kv
  if early_exit:
    c.model.recursion.strategy = "cycle"
    c.model.recursion.early_exit, c.model.recursion.exit_threshold = True, exit_threshold
    c.train.exit_loss = "aggressive"
  c.train.steps, c.train.eval_every, c.train.eval_batches = train_steps, 0, 2
  c.train.log_every, c.train.progress = max(train_steps, 1), False
  c.checkpoint.every, c.checkpoint.async_save, c.wandb.mode = 0, False, "disabled"
  c.data.cache_dir = cache_dir
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(c)
  return c


def depth_problem(name: str, layers: int) -> str | None:
  """Why model `name` cannot be built at unrolled depth `layers` (None: it can)."""
  nr = MODELS[name][1]
  if MODELS[name][3]:  # cycle: every layer shared
    return f"num_layers={layers}: not a multiple of Nr = {nr}" if layers % nr else None
  if nr > 1 and ((layers - 2) < nr or (layers - 2) % nr):
    return f"num_layers={layers}: L - 2 = {layers - 2} is not a multiple of Nr = {nr}"
  return None


def exit_label(name: str, tau: float, taus: Sequence[float]) -> str:
  """The row label of early-exit model `name` served at threshold `tau`: the name alone when
  one threshold is served, else name@tau."""
  return name if len(taus) == 1 else f"{name}@{tau:g}"


def parse_thresholds(items: Sequence[str]) -> list[float]:
  """--exit_threshold's values as floats in (0, 1], distinct; UsageError naming the flag."""
  try:
    taus = [float(x) for x in items]
  except ValueError:
    raise app.UsageError(f"--exit_threshold: {','.join(items)} is not a list of numbers") from None
  if not taus or any(not 0 < t <= 1 for t in taus) or len(set(taus)) != len(taus):
    raise app.UsageError(f"--exit_threshold: {','.join(items)}: give distinct thresholds in (0, 1]")
  return taus


def train_or_load(name: str, cfg: mlc.ConfigDict, workdir: str, trained: bool
                  ) -> routing_analysis.LoadedRun:
  """The model of `workdir`: trained there by the training loop first unless `trained` (a
  finished run resumes at its last step and only evaluates); an early-exit model with cfg's
  exit threshold."""
  if not trained:
    t0 = time.perf_counter()
    result = loop.train(cfg, workdir)
    print(f"{name}: trained {result['step']} steps in {time.perf_counter() - t0:.0f} s, "
          f"validation nll {result['nll']:.4f} ({workdir})", flush=True)
  if MODELS[name][3]:
    tau = cfg.model.recursion.exit_threshold
    return routing_analysis.load_run(workdir, {"recursion.exit_threshold": tau})
  return routing_analysis.load_run(workdir)


def make_requests(docs: Sequence[str], tokenizer, s: Settings, seed: int
                  ) -> list[engine_lib.Request]:
  """N requests: prompts of uniform length in [prompt_min, prompt_max] cut at a random offset of
  random validation documents, budgets ~ N(gen_mean, gen_std) rounded and clipped to
  [gen_min, gen_max]; no EOS (every model generates the same number of tokens)."""
  rng = np.random.default_rng(seed)
  encoded = [tokenizer.encode(d, add_special_tokens=False).ids for d in docs]
  encoded = [e for e in encoded if len(e) > s.prompt_max]
  out = []
  for _ in range(s.requests):
    ids = encoded[rng.integers(len(encoded))]
    n = int(rng.integers(s.prompt_min, s.prompt_max + 1))
    start = int(rng.integers(0, len(ids) - n + 1))
    budget = int(np.clip(round(rng.normal(s.gen_mean, s.gen_std)), s.gen_min, s.gen_max))
    out.append(engine_lib.Request(ids[start:start + n], budget))
  return out


def warm_requests(requests: Sequence[engine_lib.Request], buckets: Sequence[int]
                  ) -> list[engine_lib.Request]:
  """Two-token requests whose prompts fall in every prefill bucket (compiles them all)."""
  pool = [t for r in requests for t in r.prompt]
  lengths = sorted({min(b, max(len(r.prompt) for r in requests)) for b in buckets})
  return [engine_lib.Request(pool[:n], 2) for n in lengths]


def warm_up(engine, warm: Sequence[engine_lib.Request]) -> None:
  """Compiles every call the timed serves make: the depth-wise step at every edge size
  (DepthwiseEngine.compile_steps; a serve may first reach one mid-round), then each warm request
  alone (one prefill bucket each), twice (the first call's outputs carry the model's sharding:
  one more trace). The stats restart: they count the timed serves only."""
  if isinstance(engine, engine_lib.DepthwiseEngine):
    engine.compile_steps()
  for _ in range(2):
    for r in warm:
      engine.serve([r])
  engine.stats.clear()


def cache_bytes(model, kind: str, slots: int, max_len: int) -> int:
  """Bytes of every buffer of the cache that engine `kind` allocates for `slots` rows (from
  shapes, nothing allocated): the model's decode cache, or the depth-wise engine's compacted
  step pools (engine.depthwise_cache at the capacities' site lengths)."""
  if kind == "depthwise":
    lengths = engine_lib.site_lengths(model, max_len, compact=True)
    fn = lambda: engine_lib.depthwise_cache(model, slots, max_len, lengths)
  else:
    fn = lambda: model.init_cache(slots, max_len)
  return engine_lib.cache_bytes(jax.eval_shape(fn))


def max_slots(model, kind: str, budget_bytes: int, max_len: int) -> int:
  """The largest slot count whose cache takes at most `budget_bytes` (bytes grow linearly)."""
  one, two = (cache_bytes(model, kind, n, max_len) for n in (1, 2))
  per_slot = two - one
  return max(1, (budget_bytes - (one - per_slot)) // per_slot)


def entry_bytes(model) -> int:
  """K and V bytes of one token's entry at one attention site."""
  attn = model.core.blocks[0].attn
  return 2 * attn.num_kv_heads * attn.head_dim * jnp.dtype(model.embed.dtype).itemsize


def kv_layers(model, steps_per_token: float) -> float:
  """K/V entries per token (in layers) when a token runs `steps_per_token` recursion steps on
  average with recursion-wise caching: prelude + coda + num_shared x steps; KV sharing: prelude +
  coda + num_shared; vanilla and a plain recursion: every unrolled depth."""
  core = model.core
  outer = len(model.prelude.blocks) + len(model.coda.blocks)
  if core.rule is None:
    return outer + len(core.plan.order)
  if core.kv_mode == "share":
    return outer + core.plan.num_shared
  return outer + core.plan.num_shared * steps_per_token


def kv_layers_analytic(model) -> float:
  """kv_layers at the capacities' sum (what recursion-wise caching needs by the paper)."""
  return kv_layers(model, sum(model.core.rule.capacity) if model.core.rule is not None else 0.0)


def kv_layers_used(model, mean_depth: float) -> float:
  """kv_layers at the served tokens' realised mean depth."""
  return kv_layers(model, mean_depth)


def serve_plan(name: str, model, s: Settings) -> tuple[str, str]:
  """(engine kind, note) for model `name`: "depthwise" (compacted step pools), "sequence", or
  "not served" with the reason when no engine serves it as its method needs."""
  if model.core.rule is None:
    return "sequence", ""
  try:
    engine_lib.DepthwiseEngine(model, slots=1, max_len=s.max_len, buckets=s.buckets)
  except ValueError as e:
    why = str(e).split(": ", 1)[1]
    return ("sequence", f"depth-wise refused ({why}); served sequence-wise, every token through "
            "every step in place")
  return "depthwise", ""


def make_engine(model, kind: str, slots: int, s: Settings, profile: bool = False,
                edge_sizes: Sequence[int] | None = None):
  """The engine of `kind` at `slots` (prefill batches of up to 8 requests); `edge_sizes` for the
  depth-wise engine (None: its default per-step choice)."""
  kw = dict(slots=slots, max_len=s.max_len, buckets=s.buckets, prefill_batch=min(slots, 8))
  if kind == "depthwise":
    return engine_lib.DepthwiseEngine(model, compact=True, profile=profile,
                                      edge_sizes=edge_sizes, **kw)
  return engine_lib.Engine(model, profile=profile, **kw)


def fixed_edges(model, slots: int) -> dict[str, tuple[int]]:
  """--edge_ab's single edge sizes: every slot, and ceil(slots / sum_r c_r), the exits a step
  makes on average when every step is filled to the capacities (the engine's default before the
  per-step choice)."""
  per_step = slots / sum(model.core.rule.capacity)  # 1 + 2/3 + 1/3 sums to 1.999...: round first
  expected = max(1, min(slots, math.ceil(round(per_step, 6))))
  return {f"edge={slots}": (slots,), f"edge={expected}": (expected,)}


MAPS_PER_ENGINE = 3500  # memory maps one engine's executables took on XLA:CPU (2026-12-04 run)


def check_map_limit(engines: int, out: Callable[[str], Any] = print,
                    path: str = "/proc/sys/vm/max_map_count") -> None:
  """Warns when this many compiled engines may pass the kernel's memory-map limit: on XLA:CPU
  each executable maps its code in many pieces, and the 2026-12-04 run's 19 engines (plus 2
  profiling ones) peaked near 65,000 maps, Linux's default vm.max_map_count (LLVM then fails
  with 'Cannot allocate memory')."""
  if jax.default_backend() != "cpu" or not os.path.exists(path):
    return
  with open(path) as f:
    limit = int(f.read())
  if limit < engines * MAPS_PER_ENGINE:
    out(f"warning: up to {engines} engines may need about {engines * MAPS_PER_ENGINE} memory "
        f"maps and vm.max_map_count is {limit}; if compiling fails with 'Cannot allocate "
        "memory', raise it (sysctl -w vm.max_map_count=262144) or pass fewer --models")


def serve_once(engine, requests: Sequence[engine_lib.Request]) -> tuple[float, list]:
  """(seconds, completions) of one serve of the request set."""
  t0 = time.perf_counter()
  done = engine.serve(requests)
  return time.perf_counter() - t0, done


def settings_from_flags() -> Settings:
  base = dict(QUICK if FLAGS.quick else FULL)
  for key in ("layers", "train_steps", "requests", "rounds"):
    if getattr(FLAGS, key) is not None:
      base[key] = getattr(FLAGS, key)
  return Settings(**base)


def benchmark(s: Settings, names: Sequence[str], workdirs: dict[str, str], train_dir: str,
              batch: int = 32, seed: int = 0, overrides: dict[str, Any] | None = None,
              out: Callable[[str], Any] = print, exit_threshold: Sequence[float] = (0.5,),
              edge_ab: bool = False) -> dict[str, Any]:
  """Trains or loads the models, builds their engines at B = batch and B = max (and with
  `edge_ab` the depth-wise ones at B = batch with single edge sizes, `fixed_edges`), times them
  round-robin; returns the result (rows as in the module docstring, plus the skipped models).
  An early-exit model is trained once and served at each of `exit_threshold` (exit_label)."""
  names = ["vanilla", *[n for n in names if n != "vanilla"]]
  cache_dir = os.path.join(train_dir, "data")
  skipped, loaded, model_of, tau_of = [], {}, {}, {}
  for name in names:
    problem = depth_problem(name, s.layers)
    if problem:
      skipped.append({"model": name, "reason": problem})
      continue
    workdir = workdirs.get(name, os.path.join(train_dir, name))
    trained = name in workdirs
    for tau in exit_threshold if MODELS[name][3] else (None,):
      label = name if tau is None else exit_label(name, tau, exit_threshold)
      cfg = make_config(name, s.layers, s.train_steps, cache_dir, overrides,
                        exit_threshold[0] if tau is None else tau)
      loaded[label] = train_or_load(name, cfg, workdir, trained=trained)
      model_of[label], tau_of[label], trained = name, tau, True
  van = loaded["vanilla"]
  requests = make_requests(van.run.valid_docs, van.run.tokenizer, s, seed)
  tokens = sum(r.max_new_tokens for r in requests)
  budget = cache_bytes(van.model, "sequence", batch, s.max_len)
  warm = warm_requests(requests, s.buckets)
  check_map_limit(len(loaded) * (4 if edge_ab else 2) + 2, out)
  runs = {}  # (setting, name) -> engine; B = max equal to B: the B run's
  info, same = {}, {}
  for name, lr in loaded.items():  # name: the row's label
    model = lr.model
    kind, note = serve_plan(model_of[name], model, s)
    bmax = max_slots(model, kind, budget, s.max_len)
    settings = [("fixed", batch, None), ("max", bmax, None)]
    if edge_ab and kind == "depthwise":
      settings += [(f"fixed, {k}", batch, e) for k, e in fixed_edges(model, batch).items()]
    for setting, slots, edges in settings:
      info[(setting, name)] = dict(model=name, batch=slots, batch_setting=setting, engine=kind,
                                   note=note)
      if tau_of[name] is not None:
        info[(setting, name)]["exit_threshold"] = tau_of[name]
      if kind == "not served":
        continue
      if setting == "max" and slots == batch:
        same[(setting, name)] = ("fixed", name)
        continue
      t0 = time.perf_counter()
      engine = make_engine(model, kind, slots, s, edge_sizes=edges)
      info[(setting, name)]["edge_sizes"] = list(getattr(engine, "edge_sizes", ()))
      warm_up(engine, warm)
      info[(setting, name)]["compile_s"] = time.perf_counter() - t0
      runs[(setting, name)] = engine
  out(f"{len(requests)} requests, {tokens} tokens to generate; timing {len(runs)} engines "
      f"x {s.rounds} rounds", )
  times = {key: [] for key in runs}
  completions = {}
  for _ in range(s.rounds):
    for key, engine in runs.items():
      sec, done = serve_once(engine, requests)
      times[key].append(sec)
      completions[key] = done
  profiled = [k for k in runs if k[0] == "fixed" and k[1] in ("vanilla", "mor3")]
  for key in profiled:  # where the time goes: one profiled serve
    name = key[1]
    engine = make_engine(loaded[name].model, info[key]["engine"], info[key]["batch"], s,
                         profile=True)
    warm_up(engine, warm)
    sec, _ = serve_once(engine, requests)
    split = {k.split("/", 1)[1]: v for k, v in engine.stats.items() if k.startswith("time/")}
    split["host"] = sec - sum(split.values())
    info[key]["profile_s"] = split
    info[key]["profile_total_s"] = sec
  rows = []
  for key, row in info.items():
    setting, name = key
    model = loaded[name].model
    row["num_layers"] = model_layers(model)
    row["kv_bytes_per_token"] = cache_bytes(model, row["engine"], row["batch"], s.max_len) / (
        row["batch"] * s.max_len)
    row["kv_bytes_per_token_analytic"] = entry_bytes(model) * kv_layers_analytic(model)
    if same.get(key, key) not in runs:
      rows.append(row)
      continue
    run_key = same.get(key, key)
    done = completions[run_key]
    depth = (sum(c.depth_sum for c in done) / sum(c.depth_tokens for c in done)
             if model.core.rule is not None else float(model.core.plan.num_recursions))
    row["mean_depth"] = depth
    row["kv_bytes_per_token_used"] = entry_bytes(model) * kv_layers_used(model, depth)
    tps = [tokens / t for t in times[run_key]]
    row["tokens_per_s"] = statistics.median(tps)
    row["tokens_per_s_all"] = tps
    # vanilla's B = max is B itself (its cache is the budget): one reference for both settings
    row["speedup"] = statistics.median(
        [a / (tokens / b) for a, b in zip(tps, times[("fixed", "vanilla")], strict=True)])
    row["stats"] = dict(runs[run_key].stats)
    if "edge_rows" in row["stats"]:  # core steps per generated token fed back (decode only)
      row["mean_depth_decode"] = row["stats"]["block_rows"] / row["stats"]["edge_rows"]
    rows.append(row)
  order = {n: i for i, n in enumerate(MODELS)}
  rows.sort(key=lambda r: (r["batch_setting"] == "max", order[model_of[r["model"]]],
                           -r.get("exit_threshold", 0.0), r["batch_setting"]))
  return {
      "settings": dataclasses.asdict(s), "max_len": s.max_len, "buckets": list(s.buckets),
      "requests": len(requests), "tokens": tokens, "backend": jax.default_backend(),
      "vanilla_cache_bytes_at_batch": budget, "rows": rows, "skipped": skipped,
  }


def model_layers(model) -> int:
  """Unrolled depth of a model."""
  return len(model.prelude.blocks) + len(model.core.plan.order) + len(model.coda.blocks)


def format_table(result: dict[str, Any]) -> str:
  """Markdown table of the rows."""
  head = ["model", "B", "engine", "tokens/s", "speedup", "mean depth (decode)", "KV B/token alloc",
          "used", "analytic"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in result["rows"]:
    served = "tokens_per_s" in r
    cells = [r["model"], f"{r['batch']} ({r['batch_setting']})", r["engine"],
             f"{r['tokens_per_s']:.1f}" if served else "-",
             f"{r['speedup']:.2f}x" if served else "-",
             (f"{r['mean_depth']:.2f}" + (f" ({r['mean_depth_decode']:.2f})"
                                          if "mean_depth_decode" in r else "")) if served else "-",
             f"{r['kv_bytes_per_token']:.0f}",
             f"{r['kv_bytes_per_token_used']:.0f}" if served else "-",
             f"{r['kv_bytes_per_token_analytic']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str], out: Callable[[str], Any] = print) -> None:
  """Runs the benchmark from the flags; `out` receives the printed lines."""
  parse_flags(FLAGS, argv)
  unknown = [n for n in FLAGS.models if n not in MODELS]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; choose from {list(MODELS)}")
  logging.set_verbosity(logging.WARNING)  # no checkpointing chatter
  workdirs = dict(item.split("=", 1) for item in FLAGS.workdir)
  taus = parse_thresholds(FLAGS.exit_threshold)
  s = settings_from_flags()
  with tempfile.TemporaryDirectory() as tmp:
    result = benchmark(s, FLAGS.models, workdirs, FLAGS.train_dir or tmp, FLAGS.batch,
                       FLAGS.seed, parse_overrides(FLAGS.set), out, taus,
                       FLAGS.edge_ab)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
  out(f"L={s.layers}, {result['requests']} requests ({result['tokens']} tokens), max_len "
      f"{result['max_len']}, {s.rounds} rounds ({result['backend']})")
  out(format_table(result))
  for r in result["rows"]:
    if "profile_s" in r:
      parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["profile_s"].items())
      out(f"{r['model']} (B={r['batch']}) profiled serve {r['profile_total_s']:.2f} s: {parts}")
  for r in result["rows"]:
    if r["note"] and r["batch_setting"] == "fixed":
      out(f"{r['model']}: {r['note']}")
  for sk in result["skipped"]:
    out(f"{sk['model']}: not run: {sk['reason']}")


if __name__ == "__main__":
  run(main)
