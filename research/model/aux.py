"""Merging the aux dicts of a model's parts (blocks, stacks, cores) into the model's one aux.

Keys starting with "loss/" are weighted losses the train step adds to the LM loss; "update/<path>"
entries are new values of non-Param variables (written back after the optimizer step); the rest
are statistics. Parts are summed keywise (`add_aux`); MoE entries are then divided by the number
of MoE applications (`mean_over_layers`).
"""

def add_aux(parts: list[dict]) -> dict:
  """Keywise sum of the aux dicts of a model's parts (blocks, stacks, cores)."""
  out = {}
  for part in parts:
    for key, value in part.items():
      out[key] = out[key] + value if key in out else value
  return out


def mean_over_layers(aux: dict) -> dict:
  """`aux` (summed over the model's parts by add_aux) with every "moe/" and "loss/moe_" entry
  divided by the number of MoE applications "moe/layers" (each layer, and each depth of a tied
  layer, counts once): MoE losses and statistics are means over the MoE layers, as MaxText
  averages its per-layer balance loss. Other entries (MoR's) pass through."""
  if "moe/layers" not in aux:
    return aux
  n = aux["moe/layers"]
  return {k: v / n if k != "moe/layers" and k.startswith(("moe/", "loss/moe_")) else v
          for k, v in aux.items()}
