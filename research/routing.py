"""Pure routing functions of Mixture-of-Recursions (docs/methods/mor.md §2): capacities, top-k over
the tokens of a row, gather/scatter of rows, gates, auxiliary losses and the loss-free bias; and of
token-choice Mixture-of-Experts (docs/moe.md): expert scores, top-k experts per token, per-row
expert capacity, sort by expert / unsort with a gather-only backward, group sizes, the
per-sequence balance loss.

Routing runs per packed row and never across rows. Capacities are measured against the row length
T as in the paper (§2.2: k_r = max(1, floor(c_r T))), so k_r is static. Padding (segment 0) never
competes with a real token: it scores -inf, and a slot that must still be filled (k_r larger than
the row's real tokens) comes back with valid=False, gets gate 0 and stays untouched. Documents
packed into one row share the row's capacity (the paper packs without document masking); with
`attend_across_segments=False` the attention over a gathered subset still masks across documents
through `Tokens.segments`.
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def default_capacities(num_recursions: int) -> tuple[float, ...]:
  """c_r = (Nr - r + 1) / Nr for r = 1..Nr (§2.2): Nr=3 -> (1, 2/3, 1/3)."""
  return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def tokens_per_step(capacities: tuple[float, ...], seq_len: int) -> tuple[int, ...]:
  """k_r = max(1, floor(c_r T)) (§2.2): T=2048, Nr=3 -> (2048, 1365, 682)."""
  return tuple(max(1, int(c * seq_len)) for c in capacities)


def warmup_capacity(capacity: float, step: Array, warmup_steps: int) -> Array:
  """Capacity warm-up (§2.3): cosine decay from 1 to c over `warmup_steps` steps."""
  frac = jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)
  return capacity + (1.0 - capacity) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def live_tokens(capacity: Array, seq_len: int) -> Array:
  """max(1, floor(c T)) for a traced capacity (the k of a warm-up step)."""
  return jnp.maximum(1, jnp.floor(capacity * seq_len).astype(jnp.int32))


def select_topk(score_BC: Array, valid_BC: Array, k: int,
                k_live: Array | None = None) -> tuple[Array, Array, Array]:
  """Top-k of each row's valid candidates (§2.2 step 3), indices sorted ascending.

  Returns loc_BK (positions in the candidate axis, sorted), sel_BK (the slot holds a valid
  candidate ranked below `k_live`, if given) and target_BC (1 at the selected candidates).
  Ties go to the lower position (lax.top_k), so callers that list candidates in original order
  break ties alike.
  """
  masked = jnp.where(valid_BC, score_BC.astype(jnp.float32), -jnp.inf)
  _, loc_BK = jax.lax.top_k(masked, k)
  sel_BK = jnp.take_along_axis(valid_BC, loc_BK, axis=1)
  if k_live is not None:
    sel_BK &= jnp.arange(k)[None, :] < k_live
  loc_BK, sel_BK = jax.lax.sort((loc_BK, sel_BK), dimension=1, num_keys=1)
  rows = jnp.arange(score_BC.shape[0])[:, None]
  target_BC = jnp.zeros(score_BC.shape, bool).at[rows, loc_BK].set(sel_BK)
  return loc_BK, sel_BK, target_BC


def first_come(active_BT: Array, k: int) -> tuple[Array, Array]:
  """(idx_BK, sel_BK): the active tokens of each row in original order in k slots (k must hold
  them all; see `capped_depths`); spare slots point at inactive tokens with sel False."""
  score_BT = -jnp.arange(active_BT.shape[1], dtype=jnp.float32)[None, :]
  loc_BK, sel_BK, _ = select_topk(jnp.broadcast_to(score_BT, active_BT.shape), active_BT, k)
  return loc_BK, sel_BK


def gather_rows(x_BT: Array, idx_BK: Array) -> Array:
  """x[b, idx[b, k]] for each row (x of any rank >= 2)."""
  idx = idx_BK.reshape(idx_BK.shape + (1,) * (x_BT.ndim - 2))
  return jnp.take_along_axis(x_BT, idx, axis=1)


def scatter_add_rows(x_BTD: Array, idx_BK: Array, u_BKD: Array) -> Array:
  """x with x[b, idx[b, k]] += u[b, k]; idx holds distinct positions per row."""
  rows = jnp.arange(x_BTD.shape[0])[:, None]
  return x_BTD.at[rows, idx_BK].add(u_BKD.astype(x_BTD.dtype))


def scatter_set_rows(x_BTD: Array, idx_BK: Array, u_BKD: Array) -> Array:
  """x with x[b, idx[b, k]] = u[b, k]; idx holds distinct positions per row."""
  rows = jnp.arange(x_BTD.shape[0])[:, None]
  return x_BTD.at[rows, idx_BK].set(u_BKD.astype(x_BTD.dtype))


def expert_gate(logits: Array, func: str, alpha: float) -> Array:
  """g = alpha * func(s) (§2.2 step 2): sigmoid | tanh | none (g = s, the paper's unstable row)."""
  if func == "sigmoid":
    return alpha * jax.nn.sigmoid(logits)
  if func == "tanh":
    return alpha * jnp.tanh(logits)
  return logits


def token_probs(logits_BTN: Array, func: str, alpha: float) -> Array:
  """p = alpha * softmax(logits) or alpha * sigmoid(logits) over the Nr depths (§2.4 step 1)."""
  if func == "softmax":
    return alpha * jax.nn.softmax(logits_BTN, axis=-1)
  return alpha * jax.nn.sigmoid(logits_BTN)


def top1_depth(probs_BTN: Array, bias_N: Array) -> Array:
  """choice_BT in 0..Nr-1 = argmax of p + b (§2.4 step 2); the bias only steers selection."""
  return jnp.argmax(probs_BTN + bias_N[None, None, :], axis=-1)


def chosen_prob(probs_BTN: Array, choice_BT: Array) -> Array:
  """The gate p[choice], from the unbiased probabilities (§2.4 step 2)."""
  return jnp.take_along_axis(probs_BTN, choice_BT[..., None], axis=-1)[..., 0]


def token_buffers(num_recursions: int, seq_len: int, factor: float) -> tuple[int, ...]:
  """Slots per step for token choice: T (factor 0: exact, nothing saved), else
  min(T, ceil(factor * T * (Nr - r + 1) / Nr)), the load of step r under perfect balance."""
  if factor <= 0:
    return (seq_len,) * num_recursions
  caps = default_capacities(num_recursions)
  return tuple(min(seq_len, math.ceil(factor * c * seq_len)) for c in caps)


def capped_depths(depth_BT: Array, buffers: tuple[int, ...], before_BN: Array | None = None
                  ) -> Array:
  """Depths after overflow: a token runs step r only if it ran r-1 and is among the first
  buffers[r] such tokens of its row; it exits at its last step (like MoE token dropping).
  `before_BN`: tokens of each row that already took a slot of step r before these (decoding)."""
  ran_BT = depth_BT >= 1
  out_BT = jnp.zeros_like(depth_BT)
  for r, slots in enumerate(buffers):
    want_BT = ran_BT & (depth_BT >= r + 1)
    taken_BT = jnp.cumsum(want_BT, axis=1)
    if before_BN is not None:
      taken_BT = taken_BT + before_BN[:, r:r + 1]
    ran_BT = want_BT & (taken_BT <= slots)
    out_BT += ran_BT
  return out_BT


def bce_loss(logits_BC: Array, target_BC: Array, valid_BC: Array) -> Array:
  """Mean binary cross-entropy with logits over the valid candidates (§2.3 auxiliary loss)."""
  s = logits_BC.astype(jnp.float32)
  y = target_BC.astype(jnp.float32)
  per = jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))
  return jnp.sum(per * valid_BC) / jnp.maximum(jnp.sum(valid_BC), 1)


def z_loss(logits_BCN: Array, valid_BC: Array) -> Array:
  """Router z-loss mean(logsumexp(s)^2) over valid tokens (§2.3; s^2 for one logit)."""
  lse = jax.nn.logsumexp(logits_BCN.astype(jnp.float32), axis=-1)
  return jnp.sum(lse**2 * valid_BC) / jnp.maximum(jnp.sum(valid_BC), 1)


def threshold_accuracy(logits_BC: Array, target_BC: Array, valid_BC: Array) -> Array:
  """Fraction of valid candidates where the causal rule sigma(s) > 0.5 agrees with top-k
  (paper Table 13 "sampling accuracy")."""
  agree = (logits_BC > 0) == target_BC
  return jnp.sum(agree & valid_BC) / jnp.maximum(jnp.sum(valid_BC), 1)


def histogram(values: Array, mask: Array, bins: int) -> Array:
  """Fraction of the masked values (in [0, 1]) falling into each of `bins` equal bins."""
  b = jnp.clip((values * bins).astype(jnp.int32), 0, bins - 1)
  counts = jnp.zeros(bins).at[b.reshape(-1)].add(mask.reshape(-1).astype(jnp.float32))
  return counts / jnp.maximum(jnp.sum(mask), 1)


def load(choice_BT: Array, valid_BT: Array, n: int) -> Array:
  """Fraction of the valid tokens' choices that picked each of the n options (depths, experts).

  choice_BT may carry a trailing top-k axis [B, T, K]: each token then splits its unit over its k
  choices (the fraction of assignments).
  """
  onehot = jax.nn.one_hot(choice_BT, n)
  if choice_BT.ndim == 3:
    onehot = jnp.mean(onehot, axis=2)
  onehot = onehot * valid_BT[..., None]
  return jnp.sum(onehot, axis=(0, 1)) / jnp.maximum(jnp.sum(valid_BT), 1)


def balancing_loss(probs_BTN: Array, choice_BT: Array, valid_BT: Array) -> Array:
  """sum_i f_i P_i with f_i = Nr * load_i and P_i = mean p_i (§2.4 step 5); 1 when balanced.

  The same is the Switch / GShard MoE loss E sum_e f_e P_e (Fedus et al. 2021 Eq. 4) with a top-k
  choice_BTK (f_e: fraction of the assignments, `load`); probs must sum to 1 over the options.
  """
  n = probs_BTN.shape[-1]
  p_N = jnp.sum(probs_BTN * valid_BT[..., None], axis=(0, 1)) / jnp.maximum(jnp.sum(valid_BT), 1)
  return jnp.sum(n * load(choice_BT, valid_BT, n) * p_N)


def sequence_balancing_loss(probs_BTN: Array, choice_BTK: Array, valid_BT: Array) -> Array:
  """`balancing_loss` of each row, averaged over the rows holding a valid token: DeepSeek-V2's
  seq_aux, mean_b sum_e ce_be P_be with ce_be = count_be / (T K / E) (the CoE code's gate; spec
  rrt_coe_rmoe_rexmoe.md §2.1); 1 when every row is balanced."""
  per_row = jax.vmap(lambda p, c, v: balancing_loss(p[None], c[None], v[None]))
  has_B = jnp.any(valid_BT, axis=1)
  return jnp.sum(per_row(probs_BTN, choice_BTK, valid_BT) * has_B) / jnp.maximum(jnp.sum(has_B), 1)


def loss_free_bias(bias_N: Array, load_N: Array, rate: float) -> Array:
  """b_i + u sign(mean load - load_i) (§2.4 step 6): under-loaded depths gain u."""
  return bias_N + rate * jnp.sign(jnp.mean(load_N) - load_N)


def max_violation(load_N: Array) -> Array:
  """MaxVio = (max load - mean load) / mean load (paper Table 14)."""
  mean = jnp.mean(load_N)
  return (jnp.max(load_N) - mean) / mean


def mean_prob_entropy(probs_BTN: Array, valid_BT: Array) -> Array:
  """Entropy of the average selection distribution (paper Table 14; max ln Nr)."""
  p = jnp.sum(probs_BTN * valid_BT[..., None], axis=(0, 1))
  p = p / jnp.maximum(jnp.sum(p), 1e-9)
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-9)))


def expert_scores(logits_BTE: Array, func: str) -> Array:
  """Router scores in float32: softmax over the experts (Switch, Mixtral) or a sigmoid per expert
  (DeepSeek-V3)."""
  logits_BTE = logits_BTE.astype(jnp.float32)
  return jax.nn.softmax(logits_BTE, axis=-1) if func == "softmax" else jax.nn.sigmoid(logits_BTE)


def top_experts(scores_BTE: Array, k: int, renormalize: bool) -> tuple[Array, Array]:
  """(weights_BTK, experts_BTK): each token's k best experts in descending score (ties to the lower
  index, lax.top_k) and their scores, divided by their sum when `renormalize` (Mixtral)."""
  w_BTK, e_BTK = jax.lax.top_k(scores_BTE, k)
  if renormalize:
    w_BTK = w_BTK / jnp.sum(w_BTK, axis=-1, keepdims=True)
  return w_BTK, e_BTK


def expert_capacity(seq_len: int, k: int, num_experts: int, factor: float) -> int:
  """Slots per expert and row, MaxText's C = max(ceil(T k / E) factor, factor) (at least 1)."""
  return max(1, int(max(math.ceil(seq_len * k / num_experts) * factor, factor)))


def within_capacity(experts_BTK: Array, valid_BT: Array, num_experts: int, capacity: int) -> Array:
  """keep_BTK: the assignment is among the first `capacity` of its expert in its row, counted in
  token order and, within a token, in top-k order (MaxText generate_masks). Padding (valid False)
  takes no slot and is never kept."""
  b, t, k = experts_BTK.shape
  onehot_BME = jax.nn.one_hot(experts_BTK.reshape(b, t * k), num_experts, dtype=jnp.int32)
  onehot_BME *= jnp.repeat(valid_BT, k, axis=1)[..., None].astype(jnp.int32)
  position_BM = jnp.sum(jnp.cumsum(onehot_BME, axis=1) * onehot_BME, axis=-1)  # 1-based, 0: pad
  return ((position_BM >= 1) & (position_BM <= capacity)).reshape(b, t, k)


def sort_by_expert(experts_M: Array, keep_M: Array, num_experts: int) -> tuple[Array, Array]:
  """(perm_M, sizes_E): the stable order that groups assignments by expert with the dropped ones
  last, and the kept assignments per expert (rows past sum(sizes) belong to no group)."""
  key_M = jnp.where(keep_M, experts_M, num_experts)
  perm_M = jnp.argsort(key_M, stable=True)
  return perm_M, jnp.bincount(key_M, length=num_experts).astype(jnp.int32)


def inverse_permutation(perm_M: Array) -> Array:
  """inv with inv[perm[i]] = i."""
  return jnp.zeros_like(perm_M).at[perm_M].set(jnp.arange(perm_M.shape[0], dtype=perm_M.dtype))


@jax.custom_vjp
def permute_rows(x_MD: Array, perm_M: Array, inv_M: Array) -> Array:
  """x[perm] for a permutation perm whose inverse is inv (inverse_permutation, computed once by
  the caller for the sort and the unsort); the backward is the gather g[inv] instead of the
  scatter-add that a take's transpose would be (MaxText _sort_activations)."""
  return x_MD[perm_M]


def _permute_fwd(x_MD: Array, perm_M: Array, inv_M: Array) -> tuple[Array, Array]:
  return x_MD[perm_M], inv_M


def _permute_bwd(inv_M: Array, g_MD: Array) -> tuple[Array, None, None]:
  return g_MD[inv_M], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


PSR_SCHEDULES = ("linear", "stepwise")


def psr_boundaries(group: int, start: int, end: int) -> tuple[int, ...]:
  """The r - 1 steps of PSR-Stepwise's jumps, numpy.linspace(t_s, t_e, r - 1) (t_s alone for
  r = 2, none for r = 1), each rounded up to an integer step: t >= p iff t >= ceil(p) for an
  integer t; exact integers, p_k = t_s + ceil(k (t_e - t_s) / (r - 2))."""
  if group <= 2:
    return (start,) * (group - 1)
  return tuple(start - (-k * (end - start)) // (group - 2) for k in range(group - 1))


def psr_num_candidates(step: Array, num_local: int, group: int, start: int, end: int, *,
                       first: int = -1, schedule: str = "linear") -> Array:
  """ReXMoE Progressive Scaling Routing: the routable candidates N_t at step t, from N_0 = `first`
  (-1: N = num_local) before t_s to r N from t_e on, in integers (jit-safe on a traced step).

  linear (Eq. 6): N_t = N_0 + floor((r N - N_0)(t - t_s) / (t_e - t_s)), t clipped to [t_s, t_e];
  with N_0 = N this is Eq. 6's floor((1 + (r - 1)(t - t_s) / (t_e - t_s)) N).
  stepwise (Tab. 5 "PSR-Stepwise"): N_t = N_0 + round((r N - N_0) j / (r - 1)), rounding half up,
  j = the number of `psr_boundaries` p_k <= t; with N_0 = N, N_t = N (1 + j) (N = 64, r = 4,
  t_s = 10k, t_e = 30k: 64, then 128 from 10k, 192 from 20k, 256 from 30k).
  """
  n0, total = (num_local if first == -1 else first), group * num_local
  if schedule == "stepwise":
    bounds = psr_boundaries(group, start, end)
    if not bounds:
      return jnp.full(jnp.shape(step), n0, jnp.int32)
    j = jnp.sum(step[..., None] >= jnp.asarray(bounds, jnp.int32), axis=-1)
    return n0 + (2 * (total - n0) * j + group - 1) // (2 * (group - 1))
  t = jnp.clip(step, start, end) - start
  return n0 + ((total - n0) * t) // (end - start)


def psr_mask(key: Array, num_kept: Array, num_local: int, member: int, group: int) -> Array:
  """Local-first PSR mask [r N]: the first num_kept candidates in an order drawn from `key` that
  lists the layer's own N (member's block) before the others, each part uniformly shuffled: all
  N own and num_kept - N others drawn without replacement when num_kept >= N, else a uniform
  num_kept-subset of the own N."""
  n = num_local * group
  local_N = jnp.arange(n) // num_local == member
  u_N = jax.random.uniform(key, (n,))
  u_N = jnp.where(local_N, u_N - 1.0, u_N)  # own in [-1, 0), the others in [0, 1)
  return jnp.argsort(jnp.argsort(u_N)) < num_kept
