"""Merging the aux dicts of a model's parts (blocks, stacks, cores) into the model's one aux.

Keys starting with "loss/" are weighted losses the train step adds to the LM loss; "update/<path>"
entries are new values of non-Param variables (written back after the optimizer step); the rest
are statistics. Parts are summed keywise (`add_aux`); MoE entries are then divided by the number
of MoE applications (`mean_over_layers`), which also forms the losses pooled over all layers
(`pooled_balance`: Mixtral's balance loss, `model.moe.balance_form="mixtral"`).
"""

import jax
import jax.numpy as jnp

POOL_KEYS = ("moe/pool_counts", "moe/pool_probs", "moe/pool_tokens", "moe/pool_coeff")


def add_aux(parts: list[dict]) -> dict:
  """Keywise sum of the aux dicts of a model's parts (blocks, stacks, cores)."""
  out = {}
  for part in parts:
    for key, value in part.items():
      out[key] = out[key] + value if key in out else value
  return out


def pool_statistics(probs_BTE: jax.Array, experts_BTK: jax.Array, valid_BT: jax.Array,
                    coeff: float) -> dict[str, jax.Array]:
  """Summable statistics of one gate call for Mixtral's pooled balance loss (`pooled_balance`):
  "moe/pool_counts" [E] = sum over valid tokens of the top-k one-hot summed over k,
  "moe/pool_probs" [E] = sum over valid tokens of p_e, "moe/pool_tokens" = the valid tokens,
  "moe/pool_coeff" = the loss weight (its mean over layers is the weight)."""
  valid_BT1 = valid_BT[..., None].astype(jnp.float32)
  onehot_BTE = jnp.sum(jax.nn.one_hot(experts_BTK, probs_BTE.shape[-1]), axis=2)
  return {"moe/pool_counts": jnp.sum(onehot_BTE * valid_BT1, axis=(0, 1)),
          "moe/pool_probs": jnp.sum(probs_BTE * valid_BT1, axis=(0, 1)),
          "moe/pool_tokens": jnp.sum(valid_BT1), "moe/pool_coeff": jnp.float32(coeff)}


def pooled_balance(aux: dict) -> jnp.ndarray:
  """Mixtral's balance loss over the tokens of all layers pooled (HF transformers
  `load_balancing_loss_func`, the RMoE training code's), from the layers' summed statistics:

    B = E sum_e (c_e / N) (P_e / N)     c_e = sum over layers and valid tokens of the top-k
                                        one-hot (summed over k), P_e = sum of p_e, N = the valid
                                        token count summed over layers

  which is HF's E sum_{k, e} tokens_per_expert[k, e] router_prob_per_expert[e] (k when balanced).
  Any common scale of the sums (mean_over_layers, CoE's iteration mean) cancels."""
  counts_E, probs_E = aux["moe/pool_counts"], aux["moe/pool_probs"]
  tokens = jnp.maximum(aux["moe/pool_tokens"], 1e-9)
  return counts_E.shape[-1] * jnp.sum((counts_E / tokens) * (probs_E / tokens))


def mean_over_layers(aux: dict) -> dict:
  """`aux` (summed over the model's parts by add_aux) with every "moe/" and "loss/moe_" entry
  divided by the number of MoE applications "moe/layers" (each layer, and each depth of a tied
  layer, counts once): MoE losses and statistics are means over the MoE layers, as MaxText
  averages its per-layer balance loss. Other entries (MoR's) pass through. With the pooled
  statistics of balance_form="mixtral" (POOL_KEYS), "loss/moe_balance" = coeff * pooled_balance
  and "moe/balance_mixtral" = pooled_balance are formed here, once for the model."""
  if "moe/layers" not in aux:
    return aux
  n = aux["moe/layers"]
  out = {k: v / n if k != "moe/layers" and k.startswith(("moe/", "loss/moe_")) else v
         for k, v in aux.items()}
  if "moe/pool_counts" in aux:
    balance = pooled_balance(aux)
    out["moe/balance_mixtral"] = balance
    out["loss/moe_balance"] = out["moe/pool_coeff"] * balance  # the coefficient, mean of equals
  return out
