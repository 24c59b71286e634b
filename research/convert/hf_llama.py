"""Hugging Face Llama checkpoints (config.json + safetensors) and their mapping onto our tree.

HF stores nn.Linear weights as [out, in]; our kernels are [in, out], so every projection is
transposed. Norm scales and the embedding keep their layout. Both use the rotate-half RoPE layout,
so Q and K need no row permutation here (GGUF does: see gguf_llama.py).
"""

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
import safetensors.numpy

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# (our path inside block i, HF name inside model.layers.{i}, transposed)
BLOCK_MAP = (
  (("attn_norm", "scale"), "input_layernorm.weight", False),
  (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
  (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
  (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
  (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
  (("ffn_norm", "scale"), "post_attention_layernorm.weight", False),
  (("ffn", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
  (("ffn", "up_proj", "kernel"), "mlp.up_proj.weight", True),
  (("ffn", "down_proj", "kernel"), "mlp.down_proj.weight", True),
)
TOP_MAP = (
  (("embed", "embedding"), "model.embed_tokens.weight", False),
  (("norm", "scale"), "model.norm.weight", False),
)
HEAD_MAP = (("head", "kernel"), "lm_head.weight", True)

# config.json key -> our config.model key
CONFIG_KEYS = {
  "hidden_size": "d_model",
  "num_hidden_layers": "num_layers",
  "num_attention_heads": "num_heads",
  "num_key_value_heads": "num_kv_heads",
  "head_dim": "head_dim",
  "intermediate_size": "d_ff",
  "rope_theta": "rope_theta",
  "rms_norm_eps": "norm_eps",
  "tie_word_embeddings": "tie_embeddings",
  "vocab_size": "vocab_size",
}


def name_map(num_layers: int, tie: bool) -> list[tuple[tuple, str, bool]]:
  """Every (our path, HF name, transposed) triple of a `num_layers` model."""
  entries = list(TOP_MAP) + ([] if tie else [HEAD_MAP])
  for i in range(num_layers):
    entries += [(("core", "blocks", i, *path), f"model.layers.{i}.{name}", t)
                for path, name, t in BLOCK_MAP]
  return entries


def check_names(names: Iterable[str], num_layers: int, tie: bool, source: str) -> None:
  """Raises ValueError listing the tensors of `source` that are missing or unexpected."""
  expected = {name for _, name, _ in name_map(num_layers, tie)}
  missing, unexpected = sorted(expected - set(names)), sorted(set(names) - expected)
  if missing:
    raise ValueError(f"{source}: missing tensors {missing[:8]} ({len(missing)} in all)")
  if unexpected:
    raise ValueError(f"{source}: unsupported tensors {unexpected[:8]} ({len(unexpected)} in all; "
                     "biases and non-Llama layers are not supported)")


def hf_to_ours(params_hf: Mapping[str, np.ndarray], num_layers: int, tie: bool) -> dict:
  """HF names -> our pure parameter dict (nnx.to_pure_dict layout), kernels transposed."""
  check_names(params_hf, num_layers, tie, "hf_to_ours")
  ours: dict = {}
  for path, name, transposed in name_map(num_layers, tie):
    node = ours
    for key in path[:-1]:
      node = node.setdefault(key, {})
    w = np.asarray(params_hf[name])
    node[path[-1]] = w.T if transposed else w
  return ours


def ours_to_hf(params: Mapping) -> dict[str, np.ndarray]:
  """Our pure parameter dict -> HF names; the inverse of `hf_to_ours`."""
  tie = params.get("head") is None
  out = {}
  for path, name, transposed in name_map(len(params["core"]["blocks"]), tie):
    w = params
    for key in path:
      w = w[key]
    w = np.asarray(w)
    out[name] = w.T if transposed else w
  return out


def _unsupported(source: str, key: str, value, why: str) -> ValueError:
  return ValueError(f"{source}: {key}={value!r} is not supported ({why})")


def config_overrides(hf_config: Mapping, source: str = CONFIG) -> dict:
  """config.json -> our config.model keys; raises ValueError naming an unsupported key."""
  if hf_config.get("model_type", "llama") != "llama":
    raise _unsupported(source, "model_type", hf_config["model_type"], "only llama")
  archs = hf_config.get("architectures") or ["LlamaForCausalLM"]
  if archs != ["LlamaForCausalLM"]:
    raise _unsupported(source, "architectures", archs, "only LlamaForCausalLM")
  if hf_config.get("rope_scaling"):
    raise _unsupported(source, "rope_scaling", hf_config["rope_scaling"], "only plain RoPE")
  rope = hf_config.get("rope_parameters") or {}  # transformers >= 5 moves rope_theta here
  if rope.get("rope_type", "default") != "default":
    raise _unsupported(source, "rope_parameters", rope, "only plain RoPE")
  for key in ("attention_bias", "mlp_bias"):
    if hf_config.get(key):
      raise _unsupported(source, key, hf_config[key], "no biases in our model")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise _unsupported(source, "hidden_act", hf_config["hidden_act"], "SwiGLU uses silu")
  missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "vocab_size") if k not in hf_config]
  if missing:
    raise ValueError(f"{source}: missing keys {missing}")
  hf = dict(  # the defaults of transformers' LlamaConfig
    num_key_value_heads=hf_config["num_attention_heads"],
    head_dim=hf_config["hidden_size"] // hf_config["num_attention_heads"],
    rope_theta=rope.get("rope_theta", 10_000.0), rms_norm_eps=1e-6, tie_word_embeddings=False,
  )
  hf.update({k: v for k, v in hf_config.items() if k in CONFIG_KEYS and v is not None})
  return {ours: hf[key] for key, ours in CONFIG_KEYS.items()}


def _weight_files(path: str) -> list[str]:
  if os.path.isfile(os.path.join(path, WEIGHTS)):
    return [WEIGHTS]
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  raise FileNotFoundError(f"{path}: neither {WEIGHTS} nor {INDEX} exists")


def load_hf_llama(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a Llama checkpoint directory -> (our config.model overrides, float32 HF tensors)."""
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no {CONFIG}")
  with open(config_path) as f:
    overrides = config_overrides(json.load(f), config_path)
  params_hf = {}
  for name in _weight_files(path):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file}: listed in {INDEX} but missing")
    tensors = safetensors.numpy.load_file(file)
    params_hf.update({k: v.astype(np.float32) for k, v in tensors.items()})
  if overrides["tie_embeddings"]:
    params_hf.pop("lm_head.weight", None)  # transformers ignores it when tied
  params_hf = {k: v for k, v in params_hf.items() if not k.endswith("rotary_emb.inv_freq")}
  check_names(params_hf, overrides["num_layers"], overrides["tie_embeddings"], path)
  return overrides, params_hf


def save_hf_llama(path: str, hf_config: Mapping, params_hf: Mapping[str, np.ndarray],
                  num_shards: int = 1) -> None:
  """Writes config.json and model.safetensors, or `num_shards` files plus the index json."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(dict(hf_config), f, indent=2)
  tensors = {k: np.ascontiguousarray(v) for k, v in params_hf.items()}
  if num_shards == 1:
    safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS))
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(num_shards):
    file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    shard = {k: tensors[k] for k in names[s::num_shards]}
    safetensors.numpy.save_file(shard, os.path.join(path, file))
    weight_map.update(dict.fromkeys(shard, file))
  total = sum(v.nbytes for v in tensors.values())
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
