"""Config validation and derived fields: every check runs before anything compiles.

`validate(cfg)` raises ConfigError whose message starts with the offending key, e.g.
"config.model.num_heads=7: must divide config.model.d_model=64".
"""

import glob
import math
import os

import ml_collections as mlc

from research import routing
from research.kernels import dispatch
from research.model import moe, recursion, routers

DTYPES = ("auto", "float32", "bfloat16")
RECURSIVE_INITS = ("stepwise", "average", "lower", "random")  # RRT §2.2 (docs/rrt.md)
LORA_INITS = ("svd", "standard")  # truncated SVD of the residuals | A ~ N(0, 1/in), B = 0


class ConfigError(ValueError):
  """An invalid configuration value or combination; the message names the key."""


def _check(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def _one_of(cfg: mlc.ConfigDict, key: str, choices: tuple) -> None:
  value = lookup(cfg, key)
  _check(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")


def _positive(cfg: mlc.ConfigDict, key: str) -> None:
  value = lookup(cfg, key)
  _check(value > 0, key, value, "must be > 0")


def lookup(cfg: mlc.ConfigDict, key: str):
  """The value (or section) at dotted `key` of cfg."""
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def validate_model(cfg: mlc.ConfigDict) -> None:
  m = cfg.model
  for key in ("d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "init_std",
              "rope_theta", "norm_eps", "vocab_multiple"):
    _positive(cfg, f"model.{key}")
  if m.head_dim == -1:
    _check(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
           f"must divide config.model.d_model={m.d_model} (or set config.model.head_dim)")
    head_dim = m.d_model // m.num_heads
  else:
    _check(m.head_dim > 0, "model.head_dim", m.head_dim, "must be > 0 or -1 (d_model // heads)")
    head_dim = m.head_dim
  _check(head_dim % 2 == 0, "model.head_dim", head_dim, "RoPE needs an even head width")
  _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
         f"must divide config.model.num_heads={m.num_heads} (grouped-query attention)")
  _check(m.vocab_size == -1 or m.vocab_size > 0, "model.vocab_size", m.vocab_size,
         "must be > 0, or -1 to follow the tokenizer")
  try:
    recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for key in ("lora_rank", "lora_rank_q", "lora_rank_kv", "lora_rank_o", "lora_rank_ffn"):
    value = m.recursion[key]
    _check(value >= (0 if key == "lora_rank" else -1), f"model.recursion.{key}", value,
           "must be >= 0 (or -1 to follow lora_rank)")
  if m.recursion.lora_rank or not m.recursion.share_norms:
    _check(m.recursion.strategy != "none", "model.recursion.strategy", "none",
           "LoRA relaxation and untied norms need a sharing strategy")
  cycle_plans = ("cycle", "middle_cycle")  # a loop = one pass over the shared layers
  if m.recursion.lora_merged:
    _check(m.recursion.strategy in cycle_plans, "model.recursion.lora_merged", True,
           f"merges per-loop LoRAs: needs config.model.recursion.strategy in {cycle_plans}")
  if m.recursion.early_exit:
    _check(m.recursion.strategy in cycle_plans and m.recursion.num_recursions >= 2,
           "model.recursion.early_exit", True,
           f"one exit per loop: needs config.model.recursion.strategy in {cycle_plans} and "
           "num_recursions >= 2")
    _check(m.mor.kind == "none", "model.recursion.early_exit", True,
           "MoR routes tokens to their depth itself; use config.model.mor.kind='none'")
  tau = m.recursion.exit_threshold
  _check(0 <= tau <= 1, "model.recursion.exit_threshold", tau,
         "must be in [0, 1] (a max softmax probability; 0: no early exit)")
  if tau > 0:
    _check(m.recursion.early_exit, "model.recursion.exit_threshold", tau,
           "exits by the per-loop heads: needs config.model.recursion.early_exit=True")
    _check(m.recursion.strategy == "cycle", "model.recursion.exit_threshold", tau,
           "an exited token skips the later loops and goes to the head: needs "
           "config.model.recursion.strategy='cycle' (no coda layer to skip)")
  _one_of(cfg, "model.recursion.init", RECURSIVE_INITS)
  _one_of(cfg, "model.recursion.lora_init", LORA_INITS)
  if m.init_from:
    _check(os.path.exists(m.init_from), "model.init_from", m.init_from,
           "no such file or directory (an HF Llama directory or a .gguf file)")
  validate_mor(cfg)
  validate_moe(cfg)
  _one_of(cfg, "model.compute_dtype", DTYPES)
  _one_of(cfg, "model.param_dtype", ("float32", "bfloat16"))
  _one_of(cfg, "model.remat", ("none", "block"))
  _one_of(cfg, "model.attention_impl", dispatch.ATTENTION_IMPLS)


def validate_mor(cfg: mlc.ConfigDict) -> None:
  """Mixture-of-Recursions (docs/methods/mor.md §2-3; docs/mor.md)."""
  m, mor = cfg.model, cfg.model.mor
  _one_of(cfg, "model.mor.kind", ("none", "expert", "token"))
  if mor.kind == "none":
    return
  _one_of(cfg, "model.recursion.strategy", ("cycle", "middle_cycle"))  # as the MoR code asserts
  _check(not m.recursion.lora_merged, "model.recursion.lora_merged", True,
         "merged LoRAs batch rows at different loops; MoR routes tokens per step: use the "
         "per-depth LoRA (lora_merged=False)")
  _one_of(cfg, "model.mor.impl", ("gather", "masked"))
  _one_of(cfg, "model.mor.kv", ("cache", "share", "share_update"))
  _one_of(cfg, "model.mor.router", ("linear", "mlp", "wide_mlp"))
  _positive(cfg, "model.mor.temp")
  _check(mor.z_coeff >= 0, "model.mor.z_coeff", mor.z_coeff, "must be >= 0")
  nr, e, tc = m.recursion.num_recursions, mor.expert, mor.token
  caps = tuple(mor.capacity)
  if caps:
    _check(mor.kind == "expert", "model.mor.capacity", caps, "only expert choice has capacities")
    _check(len(caps) == nr, "model.mor.capacity", caps,
           f"needs one capacity per recursion (config.model.recursion.num_recursions={nr})")
    _check(all(0 < c <= 1 for c in caps), "model.mor.capacity", caps, "must lie in (0, 1]")
    _check(list(caps) == sorted(caps, reverse=True), "model.mor.capacity", caps,
           "must be non-increasing (S_r is a subset of S_{r-1})")
  if mor.kind == "expert":
    _one_of(cfg, "model.mor.expert.func", ("sigmoid", "tanh", "none"))
    _one_of(cfg, "model.mor.expert.gating", ("weighted", "additive"))
    _one_of(cfg, "model.mor.expert.route", ("topk", "threshold"))
    _one_of(cfg, "model.mor.expert.sampling", ("aux_loss", "aux_router"))
    _check(e.aux_coeff >= 0, "model.mor.expert.aux_coeff", e.aux_coeff, "must be >= 0")
    _positive(cfg, "model.mor.expert.aux_router_lr_mult")
    _check(e.cap_warmup_steps >= 0, "model.mor.expert.cap_warmup_steps", e.cap_warmup_steps,
           "must be >= 0")
    if e.route == "threshold":
      _check(mor.impl == "masked", "model.mor.impl", mor.impl,
             "threshold routing selects a dynamic number of tokens: use 'masked'")
    if mor.kv != "cache":
      _check(not caps or caps[0] == 1, "model.mor.capacity", caps,
             f"KV sharing (config.model.mor.kv={mor.kv!r}) needs c_1 = 1 (every token runs "
             "recursion 1)")
  else:
    _one_of(cfg, "model.mor.token.func", ("softmax", "sigmoid"))
    _one_of(cfg, "model.mor.token.gate", ("exit", "every"))
    _one_of(cfg, "model.mor.token.balancing", ("loss", "loss_free", "none"))
    for key in ("bal_coeff", "bias_rate", "bal_warmup_steps", "capacity_factor"):
      _check(tc[key] >= 0, f"model.mor.token.{key}", tc[key], "must be >= 0")
    _check(tc.exact_buckets >= 1, "model.mor.token.exact_buckets", tc.exact_buckets,
           "must be >= 1 (1: exact steps keep the whole row)")
    _check(mor.kv != "share_update", "model.mor.kv", mor.kv,
           "share_update is the expert-choice hybrid; use cache or share")
    if mor.kv == "share":
      _check(tc.capacity_factor == 0 or tc.capacity_factor >= 1, "model.mor.token.capacity_factor",
             tc.capacity_factor, "KV sharing needs every token at step 1 (0 or >= 1)")


def validate_moe(cfg: mlc.ConfigDict) -> None:
  """Routed Mixture-of-Experts and Chain-of-Experts (docs/moe.md)."""
  m, c = cfg.model, cfg.model.moe
  _check(c.num_experts >= 0, "model.moe.num_experts", c.num_experts, "must be >= 0 (0: dense)")
  _positive(cfg, "model.moe.iterations")
  if c.num_experts == 0:
    _check(c.iterations == 1, "model.moe.iterations", c.iterations,
           "Chain-of-Experts iterates the routed FFN: needs config.model.moe.num_experts > 0")
    return
  _check(1 <= c.top_k <= c.num_experts, "model.moe.top_k", c.top_k,
         f"must lie in [1, config.model.moe.num_experts={c.num_experts}]")
  _check(c.d_ff == -1 or c.d_ff > 0, "model.moe.d_ff", c.d_ff, "must be > 0, or -1 (model.d_ff)")
  _one_of(cfg, "model.moe.score", ("softmax", "sigmoid"))
  _one_of(cfg, "model.moe.impl", ("ragged", "dense"))
  _one_of(cfg, "model.moe.gmm", dispatch.GMM_IMPLS)
  _one_of(cfg, "model.moe.router", ("linear", "gru", "mlp"))
  if c.router == "mlp":
    _check(c.router_mlp_dim == -1 or c.router_mlp_dim >= 1, "model.moe.router_mlp_dim",
           c.router_mlp_dim, "must be >= 1, or -1 (2 * config.model.moe.gru_dim)")
    if c.router_mlp_dim == -1:
      _positive(cfg, "model.moe.gru_dim")
  if c.router == "gru":
    _positive(cfg, "model.moe.gru_dim")
    _one_of(cfg, "model.moe.gru_recurrence", routers.RECURRENCE)
    _check(c.iterations == 1, "model.moe.router", c.router,
           f"with config.model.moe.iterations={c.iterations}: Chain-of-Experts with RMoE's "
           "recurrent router (one GRU step per layer, or per iteration?) is not implemented; "
           "use router='linear' or iterations=1")
  _one_of(cfg, "model.moe.balance_scope", ("batch", "sequence"))
  _one_of(cfg, "model.moe.balance_form", ("switch", "mixtral"))
  if c.balance_form == "mixtral":
    _check(c.balance_scope == "batch", "model.moe.balance_form", c.balance_form,
           "pools the tokens of all layers and rows (HF Mixtral): needs "
           "config.model.moe.balance_scope='batch'")
  _one_of(cfg, "model.moe.coe_residual", ("outer", "inner", "inner_outer"))
  if c.coe_shared_router:
    _check(c.iterations > 1, "model.moe.coe_shared_router", True,
           "shares one router across iterations: needs config.model.moe.iterations > 1")
  for key in ("num_shared_experts", "capacity_factor", "balance_coeff", "z_coeff",
              "first_dense"):
    _check(c[key] >= 0, f"model.moe.{key}", c[key], "must be >= 0")
  _positive(cfg, "model.moe.every")
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  unique = plan.prelude + plan.num_shared + plan.coda
  routed = [layer for layer in range(unique) if moe.is_moe_layer(m, layer)]
  _check(bool(routed), "model.moe.first_dense", c.first_dense,
         f"with config.model.moe.every={c.every} no layer of the {unique} unique layers is MoE")
  _positive(cfg, "model.moe.rex_group")
  _check(len(routed) % c.rex_group == 0, "model.moe.rex_group", c.rex_group,
         f"must divide the {len(routed)} MoE layers (ReXMoE groups of adjacent MoE layers)")
  if c.psr:
    _one_of(cfg, "model.moe.psr_schedule", routing.PSR_SCHEDULES)
    first = c.psr_start_experts
    _check(first == -1 or c.top_k <= first <= c.num_experts, "model.moe.psr_start_experts", first,
           f"must be -1 (config.model.moe.num_experts) or lie in [config.model.moe.top_k={c.top_k}"
           f", config.model.moe.num_experts={c.num_experts}]")
    if c.rex_group == 1:
      _check(first not in (-1, c.num_experts), "model.moe.psr", True,
             "at config.model.moe.rex_group=1 PSR has nothing to grow: set "
             "config.model.moe.psr_start_experts below num_experts (the R1 control) or psr=False")
      _check(c.psr_schedule == "linear", "model.moe.psr_schedule", c.psr_schedule,
             "stepwise grows the pool in rex_group - 1 jumps, none at config.model.moe.rex_group=1;"
             " use 'linear'")
    _check(c.psr_start >= 0, "model.moe.psr_start", c.psr_start, "must be >= 0")
    _check(c.psr_end > c.psr_start, "model.moe.psr_end", c.psr_end,
           f"must be > config.model.moe.psr_start={c.psr_start}")
  if any(plan.prelude <= layer < plan.prelude + plan.num_shared for layer in routed):
    r = m.recursion
    ffn_rank = r.lora_rank if r.lora_rank_ffn == -1 else r.lora_rank_ffn
    _check(m.recursion.strategy == "none" or ffn_rank == 0, "model.recursion.lora_rank_ffn",
           r.lora_rank_ffn, "a shared MoE layer has no dense FFN to relax: set it to 0")
    _check(not r.lora_merged, "model.recursion.lora_merged", True,
           "merged per-loop LoRAs with a shared MoE layer are not supported yet")


def validate_data(cfg: mlc.ConfigDict) -> None:
  d = cfg.data
  _one_of(cfg, "data.source", ("embedded", "jsonl", "parquet", "arrayrecord"))
  _positive(cfg, "data.seq_len")
  _check(0.0 < d.valid_fraction < 1.0, "data.valid_fraction", d.valid_fraction,
         "must be in (0, 1)")
  if d.source != "embedded":
    _check(bool(d.train_files), "data.train_files", d.train_files,
           f"a file glob is required when config.data.source={d.source!r}")
    for key in ("train_files", "valid_files"):
      pattern = d[key]
      if pattern and not glob.glob(pattern):
        raise ConfigError(f"config.data.{key}={pattern!r}: no file matches this glob")
  if d.tokenizer == "bpe":
    _check(d.bpe_vocab_size >= 512, "data.bpe_vocab_size", d.bpe_vocab_size,
           "must be >= 512 (256 byte symbols plus merges)")
  else:
    path = d.tokenizer
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    _check(os.path.isfile(path), "data.tokenizer", d.tokenizer,
           "must be 'bpe', a tokenizer.json file, or a directory holding one")
  _check(d.num_threads >= 1, "data.num_threads", d.num_threads, "must be >= 1")
  _check(d.seed >= -1, "data.seed", d.seed, "must be >= 0, or -1 to follow config.seed")
  _check(d.shuffle_window >= 0, "data.shuffle_window", d.shuffle_window,
         "must be >= 0 (0: packed rows in document order)")
  _one_of(cfg, "data.positions", ("document", "row"))
  _one_of(cfg, "data.row_length", ("T+1", "T"))
  if d.score_boundary_targets:
    _check(cfg.model.attend_across_segments, "data.score_boundary_targets", True,
           "scores the target after a document's end as the MoR code does, which attends "
           "across documents: needs config.model.attend_across_segments=True")
  _check(d.worker_count >= 0, "data.worker_count", d.worker_count, "must be >= 0")


def validate_train(cfg: mlc.ConfigDict) -> None:
  t = cfg.train
  _check(t.steps > 0 or t.flop_budget > 0, "train.steps", t.steps,
         "must be > 0 (or set config.train.flop_budget)")
  for key in ("batch_size", "grad_accum", "lr", "log_every"):
    _positive(cfg, f"train.{key}")
  _check(t.eval_batches > 0 or t.eval_batches == -1, "train.eval_batches", t.eval_batches,
         "must be > 0, or -1 for the whole validation split once")
  _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
         f"must divide config.train.batch_size={t.batch_size}")
  _one_of(cfg, "train.schedule", ("wsd", "cosine", "constant"))
  _one_of(cfg, "train.nonfinite", ("stop", "skip"))
  for key in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
    _check(0.0 <= t[key] <= 1.0, f"train.{key}", t[key], "must be in [0, 1]")
  _check(t.warmup_fraction + t.decay_fraction <= 1.0, "train.decay_fraction", t.decay_fraction,
         f"warm-up ({t.warmup_fraction}) plus decay must not exceed the run")
  _check(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b2", t.b2, "betas must be in [0, 1)")
  _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0")
  _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0")
  _check(t.max_skipped >= 1, "train.max_skipped", t.max_skipped, "must be >= 1")
  _one_of(cfg, "train.exit_loss", ("final", "weighted", "aggressive"))
  if t.exit_loss != "final":
    _check(cfg.model.recursion.early_exit, "train.exit_loss", t.exit_loss,
           "needs config.model.recursion.early_exit=True")
  for key in ("exit_coeff", "exit_kd_coeff", "distill.coeff"):
    _check(lookup(t, key) >= 0, f"train.{key}", lookup(t, key), "must be >= 0")
  if t.distill.coeff:
    teacher = t.distill.teacher or cfg.model.init_from
    _check(bool(teacher), "train.distill.teacher", t.distill.teacher,
           "distillation needs a teacher: set it, or config.model.init_from")
    _check(os.path.exists(teacher), "train.distill.teacher", teacher,
           "no such file or directory (an HF Llama directory or a .gguf file)")


def validate_generate(cfg: mlc.ConfigDict) -> None:
  g = cfg.generate
  _check(bool(g.prompt), "generate.prompt", g.prompt, "must be non-empty (the text to continue)")
  _positive(cfg, "generate.num_tokens")
  _check(g.temperature >= 0, "generate.temperature", g.temperature, "must be >= 0 (0: greedy)")
  _positive(cfg, "generate.num_samples")
  _positive(cfg, "generate.slots")
  _check(g.max_len >= 2, "generate.max_len", g.max_len, "must be >= 2 (a prompt token and one "
         "generated token)")
  _one_of(cfg, "generate.engine", ("sequence", "depthwise"))
  _check(0 <= g.block_rows <= g.slots, "generate.block_rows", g.block_rows,
         f"must be in 0..config.generate.slots={g.slots} (0: slots)")
  _check(g.exit_threshold == -1 or 0 <= g.exit_threshold <= 1, "generate.exit_threshold",
         g.exit_threshold, "must be -1 (the run's model.recursion.exit_threshold) or in [0, 1]")
  if g.prompts_file:
    _check(os.path.isfile(g.prompts_file), "generate.prompts_file", g.prompts_file,
           "no such file")
    with open(g.prompts_file, encoding="utf-8") as f:
      _check(any(line.strip() for line in f), "generate.prompts_file", g.prompts_file,
             "holds no prompt (one per line; blank lines are skipped)")
    _check(g.num_samples == 1, "generate.num_samples", g.num_samples,
           "must be 1 with config.generate.prompts_file (each line is served once)")


def validate(cfg: mlc.ConfigDict) -> None:
  """Checks every section; raises ConfigError naming the first offending key."""
  _one_of(cfg, "mode", ("train", "eval", "generate"))
  validate_model(cfg)
  validate_data(cfg)
  validate_train(cfg)
  validate_generate(cfg)
  _check(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
  _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
  if cfg.checkpoint.restore_from:
    _check(os.path.isdir(cfg.checkpoint.restore_from), "checkpoint.restore_from",
           cfg.checkpoint.restore_from, "no such checkpoint directory")
  _one_of(cfg, "wandb.mode", ("offline", "online", "disabled"))
  _one_of(cfg, "distributed.enabled", ("auto", "yes", "no"))


def validate_against_devices(cfg: mlc.ConfigDict, mesh_shape: tuple[int, int, int, int],
                             process_count: int) -> None:
  """Checks that need the mesh (data, fsdp, expert, tensor): batch and width divisibility by
  the parallel axes, and what expert parallelism supports."""
  data, fsdp, expert, tensor = mesh_shape
  micro = cfg.train.batch_size // cfg.train.grad_accum
  _check(micro % (data * fsdp * expert) == 0, "train.batch_size", cfg.train.batch_size,
         f"the micro-batch ({micro} = batch_size / grad_accum) must divide by the "
         f"data*fsdp*expert mesh size {data * fsdp * expert}")
  if expert > 1:
    validate_expert_parallel(cfg, expert, tensor)
  _check(micro % process_count == 0, "train.batch_size", cfg.train.batch_size,
         f"the micro-batch ({micro}) must divide by the {process_count} processes")
  m = cfg.model
  for key in ("num_heads", "num_kv_heads", "d_ff"):
    _check(m[key] % tensor == 0, f"model.{key}", m[key],
           f"must divide by config.mesh.tensor={tensor}")
  if m.moe.num_experts:
    _check(moe.expert_d_ff(m) % tensor == 0, "model.moe.d_ff", m.moe.d_ff,
           f"the expert width must divide by config.mesh.tensor={tensor}")
  _check(m.d_model % fsdp == 0, "model.d_model", m.d_model,
         f"must divide by config.mesh.fsdp={fsdp}")


def validate_expert_parallel(cfg: mlc.ConfigDict, expert: int, tensor: int) -> None:
  """config.mesh.expert > 1 (docs/moe.md "Sharding and expert parallelism"): the experts of every
  MoE layer (a ReXMoE group's pool of r E) split evenly over the axis; what is not sharded yet is
  refused by name rather than replicated."""
  m, c = cfg.model, cfg.model.moe
  key = f"config.mesh.expert={expert}"

  def refuse(why: str) -> None:
    raise ConfigError(f"{key}: {why}")

  if c.num_experts == 0:
    refuse("expert parallelism needs MoE layers (config.model.moe.num_experts > 0); for data "
           "parallelism use config.mesh.data")
  rows = moe.num_candidates(m)
  if rows % expert:
    what = (f"the r E = {rows} experts of a ReXMoE group's pool (config.model.moe.num_experts="
            f"{c.num_experts} x rex_group={c.rex_group})" if c.rex_group > 1 else
            f"config.model.moe.num_experts={c.num_experts}")
    refuse(f"must divide {what}")
  if c.impl != "ragged":
    refuse(f"runs the ragged path; config.model.moe.impl={c.impl!r} is not expert-parallel")
  if c.gmm == "pallas":
    refuse("config.model.moe.gmm='pallas' under shard_map is not tested; use 'xla'")
  if tensor > 1:
    refuse(f"with config.mesh.tensor={tensor}: tensor parallelism inside the experts is not "
           "implemented (the expert width would be gathered, i.e. replicated)")
  if cfg.mode == "generate":
    refuse("decoding (config.mode='generate') does not shard experts yet; use "
           "config.mesh.expert=1")


def with_derived(cfg: mlc.ConfigDict, tokenizer_vocab: int) -> mlc.ConfigDict:
  """A copy with head_dim and vocab_size filled in (vocab padded to vocab_multiple)."""
  cfg = mlc.ConfigDict(cfg.to_dict())
  m = cfg.model
  if m.head_dim == -1:
    m.head_dim = m.d_model // m.num_heads
  if m.vocab_size == -1:
    m.vocab_size = math.ceil(tokenizer_vocab / m.vocab_multiple) * m.vocab_multiple
  elif m.vocab_size < tokenizer_vocab:
    raise ConfigError(f"config.model.vocab_size={m.vocab_size}: smaller than the tokenizer's "
                      f"{tokenizer_vocab} tokens")
  return cfg
