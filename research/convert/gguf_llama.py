"""GGUF Llama files (llama.cpp): dequantised weights under HF names, and the rebuilt tokenizer.

llama.cpp's converter permutes the rows of Q and K from HF's rotate-half RoPE layout into the
interleaved (GPT-J) layout; `unpermute_rope_rows` undoes it, so the tensors returned here are the
HF `LlamaForCausalLM` ones ([out, in], float32) and feed `hf_llama.hf_to_ours` unchanged.
"""

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from research.convert import hf_llama

# GGUF tensor name inside blk.{i} -> HF name inside model.layers.{i}
BLOCK_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # tokenizer.ggml.token_type of control (special) tokens
PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies
  "smollm": [pre_tokenizers.Digits(individual_digits=True)],  # \p{N} first, then the GPT-2 regex
  "gpt2": [],
}


def _field(reader: GGUFReader, key: str, path: str, default=None):
  """The value of metadata `key`, else `default`; without a default the key is required."""
  field = reader.get_field(key)
  if field is None:
    if default is None:
      raise ValueError(f"{path}: missing metadata key {key}")
    return default
  return field.contents()


def _decimal(x: float) -> float:
  """The shortest decimal that a float32 metadata value stands for (9.99999975e-06 -> 1e-05)."""
  return float(str(np.float32(x)))


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Interleaved (llama.cpp) -> rotate-half (HF) rows of a Q or K weight [out, in].

  Inverts convert_hf_to_gguf's `w.reshape(n, 2, out/n/2, in).swapaxes(1, 2)`.
  """
  out, d_in = w.shape
  return w.reshape(num_heads, out // num_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _hf_name(name: str) -> str | None:
  parts = name.split(".")
  if parts[-1] != "weight":
    return None
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
    return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.weight"
  if len(parts) == 2 and parts[0] in TOP_NAMES:
    return f"{TOP_NAMES[parts[0]]}.weight"
  return None


def config_overrides(reader: GGUFReader, path: str) -> dict:
  """GGUF `llama.*` metadata -> our config.model keys; raises ValueError on unsupported ones."""
  arch = _field(reader, "general.architecture", path)
  if arch != "llama":
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported (only llama)")
  experts = _field(reader, "llama.expert_count", path, default=0)
  if experts:
    raise ValueError(f"{path}: llama.expert_count={experts} is not supported (dense Llama only)")
  scaling = _field(reader, "llama.rope.scaling.type", path, default="none")
  if scaling != "none":
    raise ValueError(f"{path}: llama.rope.scaling.type={scaling!r} is not supported (plain RoPE)")
  d = _field(reader, "llama.embedding_length", path)
  heads = _field(reader, "llama.attention.head_count", path)
  head_dim = _field(reader, "llama.attention.key_length", path, default=d // heads)
  rope_dim = _field(reader, "llama.rope.dimension_count", path, default=head_dim)
  if rope_dim != head_dim:
    raise ValueError(f"{path}: llama.rope.dimension_count={rope_dim} is not supported "
                     f"(partial RoPE; head_dim={head_dim})")
  shapes = {t.name: t.shape for t in reader.tensors}  # GGUF shapes are [in, out]
  if "token_embd.weight" not in shapes:
    raise ValueError(f"{path}: missing tensor token_embd.weight")
  return dict(
    d_model=d,
    num_layers=_field(reader, "llama.block_count", path),
    num_heads=heads,
    num_kv_heads=_field(reader, "llama.attention.head_count_kv", path, default=heads),
    head_dim=head_dim,
    d_ff=_field(reader, "llama.feed_forward_length", path),
    rope_theta=_decimal(_field(reader, "llama.rope.freq_base", path, default=10_000.0)),
    norm_eps=_decimal(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
    tie_embeddings="output.weight" not in shapes,
    vocab_size=int(shapes["token_embd.weight"][1]),
  )


def load_gguf_llama(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a GGUF Llama -> (our config.model overrides, float32 HF tensors, Q/K un-permuted)."""
  reader = GGUFReader(path)
  overrides = config_overrides(reader, path)
  rope_heads = {"attn_q": overrides["num_heads"], "attn_k": overrides["num_kv_heads"]}
  params_hf = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name is None:
      raise ValueError(f"{path}: unsupported tensor {t.name} (dense Llama without biases only)")
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    kind = t.name.split(".")[-2]
    if kind in rope_heads:
      w = unpermute_rope_rows(w, rope_heads[kind])
    params_hf[name] = w
  hf_llama.check_names(params_hf, overrides["num_layers"], overrides["tie_embeddings"], path)
  return overrides, params_hf


def gguf_tokenizer(path: str) -> Tokenizer:
  """The byte-level BPE of `tokenizer.ggml.*`, CONTROL tokens registered as special tokens."""
  reader = GGUFReader(path)
  model = _field(reader, "tokenizer.ggml.model", path)
  pre = _field(reader, "tokenizer.ggml.pre", path, default="gpt2")
  if model != "gpt2" or pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r} is not "
                     f"supported (gpt2 BPE with pre in {sorted(PRE_TOKENIZERS)})")
  tokens = _field(reader, "tokenizer.ggml.tokens", path)
  merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges", path)]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [*PRE_TOKENIZERS[pre], pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  types = _field(reader, "tokenizer.ggml.token_type", path)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, typ in zip(tokens, types, strict=True) if typ == CONTROL])
  return tok
