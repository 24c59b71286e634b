"""AdamW with warmup-stable-decay or cosine schedules (optax).

Weight decay skips parameters with fewer than two dimensions (RMSNorm scales, biases), as
HF's Trainer does; embeddings and every matrix are decayed (docs/methods/mor.md §4.2).
"""

import jax
import ml_collections as mlc
import optax


def warmup_steps(t: mlc.ConfigDict, total_steps: int) -> int:
  """Explicit warmup_steps, else round(warmup_fraction * steps) (MoR configs: 5% of 1716 = 86)."""
  return t.warmup_steps if t.warmup_steps >= 0 else round(t.warmup_fraction * total_steps)


def make_schedule(t: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  """lr(step): linear warm-up from 0, then constant / WSD linear decay / cosine to min_lr."""
  warm = warmup_steps(t, total_steps)
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  if t.schedule == "constant":
    rest = optax.constant_schedule(peak)
  elif t.schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, max(total_steps - warm, 1), alpha=t.min_lr_ratio)
  else:  # wsd: hold the peak, then decay linearly over the last decay_fraction of the run
    decay = max(round(t.decay_fraction * total_steps), 1)  # 20% of 9438 = 1888 (MoR configs)
    stable = max(total_steps - warm - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  if warm == 0:
    return rest
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), rest], [warm])


def decay_mask(params) -> object:
  """True for the leaves that get weight decay (matrices), False for vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: mlc.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  parts.append(optax.adamw(make_schedule(t, total_steps), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
