"""An independent numpy forward pass of HF `LlamaForCausalLM`, written from its equations.

It reads HF tensor names ([out, in] weights) and shares no code with research/model, so it checks
both the name mapping and our layers. Shapes: T tokens, H query heads, K kv heads, Dh head width.
"""

from collections.abc import Mapping

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  """w * x / sqrt(mean(x^2) + eps)."""
  return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rotate_half(x: np.ndarray) -> np.ndarray:
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([-x2, x1], axis=-1)


def rope(x_THD: np.ndarray, theta: float) -> np.ndarray:
  """x cos(t w) + rotate_half(x) sin(t w), w_i = theta^(-2i/Dh), as in HF apply_rotary_pos_emb."""
  t, dh = x_THD.shape[0], x_THD.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh)
  freqs = np.outer(np.arange(t, dtype=np.float64), inv_freq)
  emb_TD = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
  cos, sin = np.cos(emb_TD).astype(x_THD.dtype), np.sin(emb_TD).astype(x_THD.dtype)
  return x_THD * cos + rotate_half(x_THD) * sin


def attention(x_TD: np.ndarray, p: Mapping, cfg: Mapping) -> np.ndarray:
  """Causal GQA: query head h reads kv head h // (H / K); softmax(q k^T / sqrt(Dh)) v."""
  t, h, kv, dh = x_TD.shape[0], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
  q_THD = rope((x_TD @ p["self_attn.q_proj.weight"].T).reshape(t, h, dh), cfg["rope_theta"])
  k_TKD = rope((x_TD @ p["self_attn.k_proj.weight"].T).reshape(t, kv, dh), cfg["rope_theta"])
  v_TKD = (x_TD @ p["self_attn.v_proj.weight"].T).reshape(t, kv, dh)
  k_THD, v_THD = np.repeat(k_TKD, h // kv, axis=1), np.repeat(v_TKD, h // kv, axis=1)
  scores_HTS = np.einsum("thd,shd->hts", q_THD, k_THD) * dh**-0.5
  scores_HTS = np.where(np.tril(np.ones((t, t), bool)), scores_HTS, -np.inf)
  probs = np.exp(scores_HTS - scores_HTS.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out_TD = np.einsum("hts,shd->thd", probs, v_THD).reshape(t, h * dh)
  return out_TD @ p["self_attn.o_proj.weight"].T


def mlp(x_TD: np.ndarray, p: Mapping) -> np.ndarray:
  """down(silu(gate x) * up x)."""
  g = x_TD @ p["mlp.gate_proj.weight"].T
  return (g / (1.0 + np.exp(-g)) * (x_TD @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T


def reference_logits(params_hf: Mapping[str, np.ndarray], tokens_T: np.ndarray, cfg: Mapping,
                     dtype=np.float64) -> np.ndarray:
  """Logits [T, V] of one sequence; `cfg` holds our config.model keys (load_*_llama overrides)."""
  p = {k: np.asarray(v, dtype) for k, v in params_hf.items()}
  eps = cfg["norm_eps"]
  x_TD = p["model.embed_tokens.weight"][np.asarray(tokens_T)]
  for i in range(cfg["num_layers"]):
    layer = {k.removeprefix(f"model.layers.{i}."): v for k, v in p.items()
             if k.startswith(f"model.layers.{i}.")}
    x_TD = x_TD + attention(rms_norm(x_TD, layer["input_layernorm.weight"], eps), layer, cfg)
    x_TD = x_TD + mlp(rms_norm(x_TD, layer["post_attention_layernorm.weight"], eps), layer)
  x_TD = rms_norm(x_TD, p["model.norm.weight"], eps)
  head = p["model.embed_tokens.weight" if cfg["tie_embeddings"] else "lm_head.weight"]
  return x_TD @ head.T


def mean_nll(logits_TV: np.ndarray, tokens_T: np.ndarray) -> float:
  """Mean over t of -log softmax(logits[t])[tokens[t + 1]] (nats)."""
  logits = np.asarray(logits_TV[:-1], np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(logz - logits[np.arange(len(logits)), np.asarray(tokens_T)[1:]]))
