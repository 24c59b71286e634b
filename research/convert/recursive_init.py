"""Recursive and Relaxed Recursive Transformers initialised from a pretrained vanilla Llama.

Bae et al. 2024 (RRT), docs/methods/rrt_coe_rmoe_rexmoe.md §1.2-§1.3, docs/rrt.md. The vanilla
model has L layers W_0..W_{L-1}; the recursive model's plan (recursion.make_plan) runs shared layer
j at the unrolled depths T(j) = plan.source_depths(j). Prelude and coda layers (middle-*) copy the
pretrained first and last layers. Shared layer j is initialised by one of METHODS:

  stepwise  W_{s_j}, s = round(linspace(first, last, K)) over the shared depths (half to even)
  average   mean of W_l over l in T(j), norm scales included
  lower     W_{first + j}
  random    fresh N(0, init_std) kernels, unit norm scales

The LoRA of middle depth d (index into plan.order, unrolled depth l = prelude + d) on projection p
is the truncated SVD of the residual R = W_l[p] - W'_j[p] in our [in, out] layout (RRT Eq. 4-5):
R = U S V^T -> A = U_r [in, r], B = S_r V_r^T [r, out], so x A B = x R at full rank. A zero
residual (or lora_init="standard") gets the standard LoRA init A ~ N(0, 1/in), B = 0.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from gguf import GGUFReader

from research import config
from research.convert import gguf_llama, hf_llama, load
from research.model import recursion
from research.model.lm import LanguageModel

METHODS = config.RECURSIVE_INITS
LORA_INITS = config.LORA_INITS
LINEARS = {  # projection -> its path inside a block (the projections that carry LoRA)
    name: ("ffn" if name in ("gate_proj", "up_proj", "down_proj") else "attn", name, "kernel")
    for name in recursion.LORA_KINDS
}


def _at(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def stepwise_sources(first: int, last: int, count: int) -> list[int]:
  """round(linspace(first, last, count)), numpy half-to-even (MoR `selection_initialize`)."""
  return [int(s) for s in np.round(np.linspace(first, last, count))]


def depth_sources(plan: recursion.LayerPlan, pretrained_layers: int) -> list[int]:
  """The pretrained layer of each middle depth d: prelude + d when the depths agree; else the
  pretrained middle is spread over the unrolled one, prelude + round(d (M0 - 1) / (M - 1)) with
  M0, M the middle depths of the pretrained and the recursive model (`stretch_init`)."""
  m, m0 = len(plan.order), pretrained_layers - plan.prelude - plan.coda
  if m == m0 or m == 1:
    return [plan.prelude + d for d in range(m)]
  return [plan.prelude + int(s) for s in np.round(np.arange(m) * (m0 - 1) / (m - 1))]


def shared_sources(plan: recursion.LayerPlan, method: str,
                   pretrained_layers: int | None = None) -> list[list[int]]:
  """The pretrained layers averaged into each shared layer j (one for stepwise/lower, [] random).

  Stepwise and Lower run over the shared (middle) depths only: for middle-* plans the range is
  [1, L-2], as in the MoR code, so the unique first and last layers are not picked twice.
  Average takes the pretrained layers at the depths that share j (`depth_sources`).
  `pretrained_layers` (default: the plan's depth) is the pretrained model's depth L0.
  """
  l0 = plan.num_layers if pretrained_layers is None else pretrained_layers
  first, last = plan.prelude, l0 - plan.coda - 1
  if method == "stepwise":
    return [[s] for s in stepwise_sources(first, last, plan.num_shared)]
  if method == "average":
    src = depth_sources(plan, l0)
    return [[src[d] for d, k in enumerate(plan.order) if k == j] for j in range(plan.num_shared)]
  if method == "lower":
    return [[first + j] for j in range(plan.num_shared)]
  if method == "random":
    return [[] for _ in range(plan.num_shared)]
  raise ValueError(f"config.model.recursion.init={method!r}: must be one of {', '.join(METHODS)}")


def _mean_block(blocks: list[dict]) -> dict:
  return jax.tree.map(lambda *ws: np.mean(np.stack(ws), 0, dtype=np.float64).astype(np.float32),
                      *blocks)


def _random_block(like: dict, std: float, rng: np.random.Generator) -> dict:
  """N(0, std) kernels and unit norm scales shaped like the block `like`."""
  return jax.tree.map(lambda w: (np.ones(w.shape) if w.ndim == 1 else
                                 rng.normal(0.0, std, w.shape)).astype(np.float32), like)


def svd_lora(r_IO: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Rank-`rank` truncated SVD of R [in, out] (RRT Eq. 4): A = U_r [in, r], B = S_r V_r^T [r, out].

  U_r comes from the eigenvectors of the smaller Gram matrix (float64), and B = U_r^T R. These are
  LAPACK's SVD factors up to column signs, but robust on a busy CPU, where multi-threaded gesdd
  was measured 200x slower (50 s against 0.26 s for one 576 x 1536 residual).
  """
  r = r_IO.astype(np.float64)
  if r.shape[0] <= r.shape[1]:
    u_r = np.linalg.eigh(r @ r.T)[1][:, ::-1][:, :rank]  # eigh sorts ascending
  else:
    v_r = np.linalg.eigh(r.T @ r)[1][:, ::-1][:, :rank]
    u_r = np.linalg.qr(r @ v_r)[0]  # R V_r = U_r S_r: orthonormalise its columns
  return u_r, u_r.T @ r


def _relaxation(plan: recursion.LayerPlan, depth_layers: list[dict], shared: list[dict],
                m: mlc.ConfigDict, lora_init: str, rng: np.random.Generator) -> dict:
  """The core's per-depth parameters: LoRA factors and, with untied norms, the depths' norms,
  from the pretrained layer of each middle depth (`depth_layers`)."""
  core = {}
  if not m.recursion.share_norms:  # each depth keeps its own pretrained norm scales
    core["attn_norms"] = np.stack([layer["attn_norm"]["scale"] for layer in depth_layers])
    core["ffn_norms"] = np.stack([layer["ffn_norm"]["scale"] for layer in depth_layers])
  lora = {}
  for name, (din, rank, dout) in recursion.lora_shapes(m).items():
    a_NIR, b_NRO = [], []
    for layer, j in zip(depth_layers, plan.order, strict=True):
      r_IO = _at(layer, LINEARS[name]) - _at(shared[j], LINEARS[name])
      if lora_init == "svd" and r_IO.any():
        a_IR, b_RO = svd_lora(r_IO, rank)
      else:
        a_IR, b_RO = rng.normal(0.0, din**-0.5, (din, rank)), np.zeros((rank, dout))
      a_NIR.append(a_IR)
      b_NRO.append(b_RO)
    lora[f"{name}_a"] = np.stack(a_NIR).astype(np.float32)
    lora[f"{name}_b"] = np.stack(b_NRO).astype(np.float32)
  if lora:
    core["lora"] = lora
  return core


def recursive_params(vanilla_params: dict, model_cfg: mlc.ConfigDict, method: str,
                     lora_init: str = "svd", seed: int = 0) -> dict:
  """The pure parameter dict of `LanguageModel(model_cfg)` initialised from a vanilla model.

  `vanilla_params` is our pure dict of the L0-layer vanilla model (`hf_llama.hf_to_ours`), with
  model_cfg.num_layers = L0 and the same widths, or any unrolled depth with
  model.recursion.stretch_init (depth_sources). Arrays are float32 numpy.
  """
  if lora_init not in LORA_INITS:
    raise ValueError(f"config.model.recursion.lora_init={lora_init!r}: must be one of "
                     f"{', '.join(LORA_INITS)}")
  m = model_cfg
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  blocks = vanilla_params["core"]["blocks"]
  l0 = len(blocks)
  if l0 != plan.num_layers and not m.recursion.stretch_init:
    raise ValueError(f"config.model.num_layers={m.num_layers}: the pretrained model has "
                     f"{l0} layers (config.model.recursion.stretch_init=True spreads them)")
  f32 = lambda tree: jax.tree.map(lambda w: np.asarray(w, np.float32), tree)
  layers = [f32(blocks[i]) for i in range(l0)]
  rng = np.random.default_rng(seed)
  shared = [_mean_block([layers[i] for i in src]) if src else _random_block(
      layers[0], m.init_std, rng) for src in shared_sources(plan, method, l0)]
  out = {key: f32(value) for key, value in vanilla_params.items() if key != "core"}
  if plan.prelude:
    out["prelude"] = {"blocks": dict(enumerate(layers[:plan.prelude]))}
  if plan.coda:
    out["coda"] = {"blocks": dict(enumerate(layers[l0 - plan.coda:]))}
  out["core"] = {"blocks": dict(enumerate(shared))}
  if m.recursion.strategy != "none":
    depth_layers = [layers[i] for i in depth_sources(plan, l0)]
    out["core"].update(_relaxation(plan, depth_layers, shared, m, lora_init, rng))
  return out


def truncation_errors(vanilla_params: dict, params: dict, model_cfg: mlc.ConfigDict
                      ) -> dict[tuple[int, str], tuple[np.ndarray, float]]:
  """(depth, projection) -> (singular values of R, ||R - A B||_F) of a relaxed model's LoRA.

  R = W_l - W'_j is recomputed from `vanilla_params` and the shared layers in `params`; a
  projection without LoRA (rank 0) has error ||R||_F. Eckart-Young: error = sqrt(sum_{i>r} s_i^2).
  """
  m = model_cfg
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  lora = params["core"].get("lora", {})
  out = {}
  for d, j in enumerate(plan.order):
    layer = vanilla_params["core"]["blocks"][plan.prelude + d]
    for name, path in LINEARS.items():
      r_IO = (np.asarray(_at(layer, path), np.float64)
              - np.asarray(_at(params["core"]["blocks"][j], path), np.float64))
      sigma = np.linalg.svd(r_IO, compute_uv=False)
      if f"{name}_a" in lora:
        r_IO = r_IO - (np.asarray(lora[f"{name}_a"][d], np.float64)
                       @ np.asarray(lora[f"{name}_b"][d], np.float64))
      out[d, name] = (sigma, float(np.linalg.norm(r_IO)))
  return out


def read_architecture(path: str) -> dict:
  """The config.model overrides of a checkpoint (HF directory or .gguf) without its weights."""
  if path.endswith(".gguf"):
    return gguf_llama.config_overrides(GGUFReader(path), path)
  config_path = os.path.join(path, hf_llama.CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no {hf_llama.CONFIG}")
  with open(config_path) as f:
    return hf_llama.config_overrides(json.load(f), config_path)


def build(model_cfg: mlc.ConfigDict, params: dict) -> LanguageModel:
  """`LanguageModel(model_cfg)` holding `params` (cast to param_dtype), without a random init."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  expected = nnx.to_pure_dict(state)
  check_tree(params, expected)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda w, s: jnp.asarray(w, s.dtype), params,
                                               expected))
  nnx.update(model, state)
  return model


def check_tree(params: dict, expected: dict) -> None:
  """Raises ValueError naming missing and unexpected parameters, or the first mis-shaped one."""
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  name = lambda path: ".".join(str(getattr(k, "key", k)) for k in path)
  missing = sorted(map(name, set(want) - set(flat)))
  extra = sorted(map(name, set(flat) - set(want)))
  if missing or extra:
    raise ValueError(f"parameters missing: {missing[:4]}, not in the model: {extra[:4]}")
  for path, w in flat.items():
    if np.shape(w) != want[path].shape:
      raise ValueError(f"parameter {name(path)}: shape {np.shape(w)}, the model has "
                       f"{want[path].shape}")


def load_recursive_from_pretrained(path: str, model_cfg_base: mlc.ConfigDict, method: str,
                                   lora_init: str = "svd", seed: int = 0
                                   ) -> tuple[mlc.ConfigDict, LanguageModel]:
  """`model_cfg_base` with the checkpoint's architecture keys, and the recursive model built from
  it; recursion.* (strategy, Nr, ranks, share_norms) come from `model_cfg_base`."""
  overrides, params_hf = load.read_pretrained(path)
  cfg = mlc.ConfigDict(model_cfg_base.to_dict())
  l0 = overrides["num_layers"]
  cfg.update({k: v for k, v in overrides.items()
              if k != "num_layers" or not cfg.recursion.stretch_init})
  config.validate_model(mlc.ConfigDict({"model": cfg}))
  vanilla = hf_llama.hf_to_ours(params_hf, l0, cfg.tie_embeddings)
  return cfg, build(cfg, recursive_params(vanilla, cfg, method, lora_init, seed))


def with_pretrained(cfg: mlc.ConfigDict, cache_dir: str) -> mlc.ConfigDict:
  """A copy of the full config with model.init_from's architecture keys (vocab_size included)
  and, when data.tokenizer is "bpe", data.tokenizer set to the checkpoint's tokenizer.json."""
  cfg = mlc.ConfigDict(cfg.to_dict())
  architecture = read_architecture(cfg.model.init_from)
  if cfg.model.recursion.stretch_init:  # the config's unrolled depth stays
    architecture.pop("num_layers")
  cfg.model.update(architecture)
  config.validate_model(cfg)
  if cfg.data.tokenizer == "bpe":
    cfg.data.tokenizer = tokenizer_file(cfg.model.init_from, cache_dir)
  return cfg


def tokenizer_file(path: str, cache_dir: str) -> str:
  """The tokenizer.json of a checkpoint: next to HF weights, or rebuilt from a .gguf into
  `cache_dir` (rewritten atomically on every call; the content is deterministic)."""
  if not path.endswith(".gguf"):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path}: no tokenizer.json next to the weights")
    return file
  os.makedirs(cache_dir, exist_ok=True)
  file = os.path.join(cache_dir, f"tokenizer-{os.path.basename(path).removesuffix('.gguf')}.json")
  tmp = f"{file}.tmp{os.getpid()}"
  gguf_llama.gguf_tokenizer(path).save(tmp)
  os.replace(tmp, file)
  return file


def init_params_from_config(model_cfg: mlc.ConfigDict, seed: int = 0) -> dict | None:
  """The pure parameter dict (numpy, param_dtype) for model.init_from; None when it is empty.

  model_cfg must already carry the checkpoint's architecture (`with_pretrained`); a mismatch
  raises ConfigError naming the key.
  """
  if not model_cfg.init_from:
    return None
  overrides, params_hf = load.read_pretrained(model_cfg.init_from)
  l0 = overrides["num_layers"]
  if model_cfg.recursion.stretch_init:
    overrides = {k: v for k, v in overrides.items() if k != "num_layers"}
  for key, value in overrides.items():
    if model_cfg[key] != value:
      raise config.ConfigError(f"config.model.{key}={model_cfg[key]!r}: the checkpoint "
                               f"config.model.init_from={model_cfg.init_from!r} has {value!r}")
  vanilla = hf_llama.hf_to_ours(params_hf, l0, model_cfg.tie_embeddings)
  r = model_cfg.recursion
  params = recursive_params(vanilla, model_cfg, r.init, r.lora_init, seed)
  dtype = jnp.dtype(model_cfg.param_dtype)
  return jax.tree.map(lambda w: np.asarray(w, dtype), params)
