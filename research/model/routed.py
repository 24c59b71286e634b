"""The one routed-compute path: select -> gather -> compute -> scatter with gate.

A router only decides; its decision reaches the compute as `Slots`: slot k of batch row b holds
the token at row position idx[b, k] of x, valid[b, k] False for a spare slot (its result is
dropped). MoR expert choice (Eq. 2.1: H[S] += g f(H[S])), MoR token choice (the state after the
step is set) and the MoE sort path (rows permuted by expert, unpermuted and gate-weighted) are
all

  x' = scatter(x, compute(gather(x, slots)), slots, gate, mode)     (routed_apply)

with three scatter modes: "add" x + g y at the valid slots; "set" y there; "out" g y there and 0
elsewhere (an FFN's output, to which the block adds its residual).

Two special forms keep the common cases cheap. `idx=None`: the slots are the whole row in order
(every token, masked by `valid`), so there is no gather and the scatter is a select. `inv` given:
the slots are a permutation of x's rows (MoE sorted by expert), whose inverse brings the results
back by a gather with a gather-only backward (routing.permute_rows) instead of a scatter-add.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from research import routing

Array = jax.Array


class Slots(NamedTuple):
  """Where each slot's token comes from (module docstring). idx, valid, inv: [B, K]."""

  idx: Array | None
  valid: Array
  inv: Array | None = None


def in_place(valid_BT: Array) -> Slots:
  """The whole row in order, the tokens outside `valid_BT` masked (no gather, no scatter)."""
  return Slots(None, valid_BT)


def gather(x_BT: Array, slots: Slots) -> Array:
  """x at the slots [B, K, ...] (x of any rank >= 2)."""
  if slots.idx is None:
    return x_BT
  if slots.inv is not None:
    return jax.vmap(routing.permute_rows)(x_BT, slots.idx, slots.inv)
  return routing.gather_rows(x_BT, slots.idx)


def scatter(x_BTD: Array, y_BKD: Array, slots: Slots, gate_BK: Array | None = None,
            mode: str = "add") -> Array:
  """x with the slots' results y put back at their tokens (module docstring): "add" x + g y,
  "set" y, "out" g y (0 at tokens no valid slot holds); g = 1 when `gate_BK` is None."""
  valid = slots.valid[..., None]
  if mode != "set" and gate_BK is not None:
    y_BKD = gate_BK[..., None].astype(y_BKD.dtype) * y_BKD
  y_BKD = y_BKD.astype(x_BTD.dtype)
  if slots.idx is None:
    base = jnp.zeros_like(x_BTD) if mode == "out" else x_BTD
    return jnp.where(valid, x_BTD + y_BKD if mode == "add" else y_BKD, base)
  if slots.inv is not None:  # a permutation: every token comes back through the inverse
    y_BTD = jax.vmap(routing.permute_rows)(jnp.where(valid, y_BKD, 0), slots.inv, slots.idx)
    return x_BTD + y_BTD if mode == "add" else y_BTD
  if mode == "set":
    return routing.scatter_set_rows(x_BTD, slots.idx,
                                    jnp.where(valid, y_BKD, routing.gather_rows(x_BTD, slots.idx)))
  base = jnp.zeros_like(x_BTD) if mode == "out" else x_BTD
  return routing.scatter_add_rows(base, slots.idx, jnp.where(valid, y_BKD, 0))


def routed_apply(x_BTD: Array, slots: Slots, compute: Callable[[Array], tuple[Array, Any]],
                 gate_BK: Array | None = None, mode: str = "add") -> tuple[Array, Any]:
  """(scatter(x, y, slots, gate, mode), side) with (y, side) = compute(gather(x, slots)):
  `compute` sees only the routed tokens [B, K, D] (its FLOPs are the slots', not the row's) and
  may return side outputs (aux, a carry) with its results."""
  y_BKD, side = compute(gather(x_BTD, slots))
  return scatter(x_BTD, y_BKD, slots, gate_BK, mode), side
