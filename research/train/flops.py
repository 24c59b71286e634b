"""Analytic FLOPs per token, two conventions.

`train_flops_per_token`: our exact count for MFU. Every matmul (q, k, v with GQA widths, o,
SwiGLU, LM head, MoR routers) at 2 FLOPs per MAC, causal attention at its useful half (QK^T and AV
over T/2 keys on average), forward + backward = 3 x forward. Embedding lookups, norms and softmax
are free. A routed (MoE) FFN counts its router and the experts it runs: top k + shared (all E
for impl="dense"; dropped assignments still count, an upper bound with capacity), C times for
Chain-of-Experts (the inner residual adds are free). A MoR core
counts what its implementation really computes: the gathered tokens of each step (k_r for expert
choice, the slots for token choice), or the full length for impl="masked". Exact token choice
(capacity_factor 0) runs each step on a data-dependent bucket (mor.exact_step): it is counted at
the full length, an upper bound, unless `step_tokens` gives the tokens each step ran on.

`paper_flops_per_token`: the MoR paper's App. D convention (docs/methods/mor.md §4.3), forward
only: K/V projections counted as d x d (GQA ignored), attention 2*d*T per layer, no embedding or
head; a MoR step at capacity c costs c * linear + c^2 * attention (recursion-wise caching) or
c * (linear without K/V + attention) (KV sharing, steps r >= 2); token choice assumes perfect
balance. It reproduces the released step counts and sets isoFLOP budgets.
"""

import ml_collections as mlc

from research import routing
from research.model import moe, mor, recursion, routers


def ffn_flops(m: mlc.ConfigDict, routed: bool, *, active: bool = False) -> float:
  """Forward FLOPs per token of a block's FFN: the dense SwiGLU 3 d F, or a routed FFN's router
  (moe.router_macs: d E, or RMoE's d p + 6 p^2 + p E) plus 3 d F_e per expert run: its top k (all
  E, ReXMoE's r E, for impl="dense", unless `active`) and the shared experts, once per
  Chain-of-Experts iteration (C router calls, C x the experts)."""
  d = m.d_model
  if not routed:
    return 2.0 * 3 * d * m.d_ff
  c = m.moe
  run = c.top_k if active or c.impl != "dense" else moe.num_candidates(m)
  per_iteration = moe.router_macs(m) + 3 * d * moe.expert_d_ff(m) * (run + c.num_shared_experts)
  return 2.0 * c.iterations * per_iteration


def routed_depths(m: mlc.ConfigDict) -> tuple[bool, ...]:
  """For each unrolled depth, whether its block has the routed FFN (moe.is_moe_layer of the unique
  layer it runs)."""
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  layers = (*range(plan.prelude), *(plan.prelude + j for j in plan.order),
            *range(plan.prelude + plan.num_shared, plan.prelude + plan.num_shared + plan.coda))
  return tuple(moe.is_moe_layer(m, layer) for layer in layers)


def layer_matmul_flops(m: mlc.ConfigDict, routed: bool = False) -> float:
  """Forward FLOPs per token of one block's projections (`routed`: with a routed FFN)."""
  d, dh = m.d_model, m.head_dim
  attn = d * m.num_heads * dh * 2 + d * m.num_kv_heads * dh * 2
  return 2.0 * attn + ffn_flops(m, routed)


def layer_attention_flops(m: mlc.ConfigDict, seq_len: int) -> float:
  """Forward FLOPs per token of QK^T and AV over the causal half of the context."""
  return 2.0 * 2 * m.num_heads * m.head_dim * seq_len / 2


def mor_capacities(m: mlc.ConfigDict) -> tuple[float, ...]:
  """Fraction of the tokens at each recursion step: expert capacities, or for token choice the
  perfect-balance occupancy (Nr - r + 1) / Nr (the paper's assumption)."""
  if m.mor.kind == "expert":
    return mor.capacities(m)
  return routing.default_capacities(m.recursion.num_recursions)


def computed_tokens(m: mlc.ConfigDict, seq_len: int) -> tuple[int, ...]:
  """Tokens per row that each MoR step's blocks really run on."""
  nr = m.recursion.num_recursions
  if m.mor.impl == "masked":
    return (seq_len,) * nr
  if m.mor.kind == "token":
    return routing.token_buffers(nr, seq_len, m.mor.token.capacity_factor)
  if m.mor.expert.cap_warmup_steps > 0:  # no compaction while the capacities warm up
    return (seq_len,) * nr
  return routing.tokens_per_step(mor.capacities(m), seq_len)


def router_flops(m: mlc.ConfigDict, seq_len: int,
                 step_tokens: tuple[float, ...] | None = None) -> float:
  """Forward FLOPs per token of the MoR routers over their candidates."""
  d, nr = m.d_model, m.recursion.num_recursions
  hidden = routers.HIDDEN[m.mor.router] * d

  def per_token(out):
    return 2.0 * (d * hidden + hidden * out if hidden else d * out)

  if m.mor.kind == "token":
    return per_token(nr)
  candidates = (seq_len, *(step_tokens or computed_tokens(m, seq_len))[:-1])
  copies = 2 if m.mor.expert.sampling == "aux_router" else 1
  return copies * per_token(1) * sum(candidates) / seq_len


def forward_flops_per_token(m: mlc.ConfigDict, seq_len: int,
                            step_tokens: tuple[float, ...] | None = None) -> float:
  """Forward FLOPs per token (module docstring: what each implementation really computes);
  `step_tokens`: the tokens per row each MoR step ran on, in place of computed_tokens."""
  head = 2.0 * m.d_model * m.vocab_size
  if m.mor.kind == "none":
    return head + sum(layer_matmul_flops(m, routed) + layer_attention_flops(m, seq_len)
                      for routed in routed_depths(m))
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  kv_proj = 2.0 * 2 * m.d_model * m.num_kv_heads * m.head_dim
  routed = routed_depths(m)
  outer = [*routed[:plan.prelude], *routed[len(routed) - plan.coda:]]
  total = head + router_flops(m, seq_len, step_tokens) + sum(
      layer_matmul_flops(m, x) + layer_attention_flops(m, seq_len) for x in outer)
  shared = [moe.is_moe_layer(m, plan.prelude + j) for j in range(plan.num_shared)]
  for r, n in enumerate(step_tokens or computed_tokens(m, seq_len)):
    for x in shared:
      if r == 0 or m.mor.kv == "cache":
        step = layer_matmul_flops(m, x) + layer_attention_flops(m, n)
      else:  # queries of the step over recursion 1's keys; "share" skips the K/V projections
        step = (layer_matmul_flops(m, x) - (kv_proj if m.mor.kv == "share" else 0.0)
                + layer_attention_flops(m, seq_len))
      total += n / seq_len * step
  return total


def train_flops_per_token(m: mlc.ConfigDict, seq_len: int,
                          step_tokens: tuple[float, ...] | None = None) -> float:
  return 3.0 * forward_flops_per_token(m, seq_len, step_tokens)


def paper_flops_per_token(m: mlc.ConfigDict, seq_len: int) -> float:
  """MoR App. D: L * (2 (4 d^2 + 3 d d_ff) + 2 d T), forward only; MoR steps as in §4.3. A routed
  FFN counts its active experts and router (ffn_flops with active=True; C times for CoE) in place
  of 3 d d_ff."""
  d = m.d_model
  attn = 2.0 * d * seq_len
  if m.mor.kind == "none":
    return sum(2.0 * 4 * d * d + ffn_flops(m, routed, active=True) + attn
               for routed in routed_depths(m))
  plan = recursion.make_plan(m.recursion.strategy, m.num_layers, m.recursion.num_recursions)
  routed = routed_depths(m)
  layer = lambda x: 2.0 * 4 * d * d + ffn_flops(m, x, active=True)  # = linear when dense
  no_kv = lambda x: layer(x) - 2.0 * 2 * d * d
  outer = [*routed[:plan.prelude], *routed[len(routed) - plan.coda:]]
  total = sum(layer(x) + attn for x in outer)
  shared = [moe.is_moe_layer(m, plan.prelude + j) for j in range(plan.num_shared)]
  for r, c in enumerate(mor_capacities(m)):
    for x in shared:
      if r == 0 or m.mor.kv == "cache":
        step = c * layer(x) + c * c * attn
      else:  # q-length c T over all T keys; share skips the K/V projections
        step = c * ((no_kv(x) if m.mor.kv == "share" else layer(x)) + attn)
      total += step
  return total


def kv_cache_fraction(m: mlc.ConfigDict) -> float:
  """KV memory of the recursion steps relative to caching every token at every step (Table 2):
  mean c_r with recursion-wise caching ((Nr + 1) / (2 Nr) by default), 1 / Nr with sharing."""
  caps = mor_capacities(m)
  return 1.0 / len(caps) if m.mor.kv != "cache" else sum(caps) / len(caps)
