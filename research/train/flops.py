"""Analytic FLOPs per token, two conventions.

`train_flops_per_token`: our exact count for MFU. Every matmul (q, k, v with GQA widths, o,
SwiGLU, LM head) at 2 FLOPs per MAC, causal attention at its useful half (QK^T and AV over T/2
keys on average), forward + backward = 3 x forward. Embedding lookups, norms and softmax are free.

`paper_flops_per_token`: the MoR paper's App. D convention (shared/specs/mor.md §4.3), forward
only: K/V projections counted as d x d (GQA ignored), attention 2*d*T per layer, no embedding or
head. It reproduces the released step counts and sets isoFLOP budgets.
"""

import ml_collections as mlc


def layer_matmul_flops(m: mlc.ConfigDict) -> float:
  """Forward FLOPs per token of one block's projections."""
  d, dh = m.d_model, m.head_dim
  attn = d * m.num_heads * dh * 2 + d * m.num_kv_heads * dh * 2
  return 2.0 * (attn + 3 * d * m.d_ff)


def layer_attention_flops(m: mlc.ConfigDict, seq_len: int) -> float:
  """Forward FLOPs per token of QK^T and AV over the causal half of the context."""
  return 2.0 * 2 * m.num_heads * m.head_dim * seq_len / 2


def forward_flops_per_token(m: mlc.ConfigDict, seq_len: int) -> float:
  per_layer = layer_matmul_flops(m) + layer_attention_flops(m, seq_len)
  return m.num_layers * per_layer + 2.0 * m.d_model * m.vocab_size


def train_flops_per_token(m: mlc.ConfigDict, seq_len: int) -> float:
  return 3.0 * forward_flops_per_token(m, seq_len)


def paper_flops_per_token(m: mlc.ConfigDict, seq_len: int) -> float:
  """MoR App. D: L * (2 (4 d^2 + 3 d d_ff) + 2 d T), forward only."""
  d = m.d_model
  return m.num_layers * (2.0 * (4 * d * d + 3 * d * m.d_ff) + 2.0 * d * seq_len)
