"""Confidence-based early exit in decoding (Relaxed Recursive Transformers §2.4; docs/inference.md
"Early exit").

A recursive model trained with one exit per loop (model.recursion.early_exit: the final norm and LM
head after every loop) can stop a token after loop r when its exit is confident:

  token t runs loop r + 1  iff  it ran loop r  and  max_v softmax(head(h_t^r))_v < tau

(tau = model.recursion.exit_threshold; loop 1 always runs). The rule plugs into the recursion core
like a MoR rule: step r runs, in place, on the tokens still in, and leaves the others' state as it
was (h_t = h_t^(exit loop)), so the LM head after the core gives every token its exit's logits.
The decision reads only the token's own state, so it is causal: a full forward and token-by-token
decoding route alike (tests/test_decode.py).

Keys and values of the loops a token skipped: recursion-wise, as MoR's caching (§3.1 of the MoR
paper). A token writes loop r's K/V only if it ran loop r, and a later token at loop r attends to
the earlier tokens that ran it. The RRT paper's throughput simulation does not model this
(App. K: "KV caches of exited tokens at later loops are not charged"); CALM-style copying of the
exit state into the skipped loops is the other choice, and not implemented. With tau = 1 no token
ever exits, and the model is the plain recursive model bit for bit.

Training never routes: the exit losses (train.exit_loss) read every loop's exit
(LanguageModel(..., exits=True)); the threshold is a serving choice.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc

from research import routing
from research.model import aux as aux_lib
from research.model import mor, routed
from research.model.layers import Carry, Tokens

Array = jax.Array
Head = Callable[[Array], Array]  # hidden states [..., D] -> float32 logits [..., V]


def confidence(logits_BTV: Array) -> Array:
  """The softmax response of an exit: max_v softmax(logits)_v."""
  return jnp.exp(jnp.max(logits_BTV, axis=-1) - jax.nn.logsumexp(logits_BTV, axis=-1))


@dataclasses.dataclass(frozen=True)
class ConfidenceExit:
  """The early-exit rule of a recursion core (module docstring). `capacity` is 1 at every loop
  (nothing is capped); `mode` "set": a loop's output replaces the state."""

  threshold: float
  num_recursions: int
  mode = "set"

  @property
  def capacity(self) -> tuple[float, ...]:
    return (1.0,) * self.num_recursions

  def __call__(self, core, x_BTD: Array, tok: Tokens, carry: Carry, head: Head | None = None
               ) -> tuple[Array, dict, Carry]:
    """(state after each token's last loop, aux with route/selected and route/depth (loops run),
    carry)."""
    if head is None:
      raise ValueError("ConfidenceExit needs the model's exit head (LanguageModel passes it)")
    valid_BT = tok.segments != 0
    active_BT, selected, auxes = valid_BT, [], []
    for r in range(self.num_recursions):
      if r > 0:
        active_BT = active_BT & self.decide(x_BTD, r, head)
      x_BTD, (aux, carry) = core.run_step(r, x_BTD, tok, routed.in_place(active_BT), carry,
                                          mode="set")
      selected.append(active_BT)
      auxes.append(aux)
    aux = aux_lib.add_aux(auxes)
    aux.update(mor.route_aux(selected, [None] * self.num_recursions))
    aux["exit/depth_frac"] = routing.load(aux["route/depth"], valid_BT, self.num_recursions + 1)
    return x_BTD, aux, carry

  def decide(self, x_BTD: Array, r: int, head: Head) -> Array:
    """Whether each token, with state x after loop r (1-based: r loops run), runs loop r + 1."""
    del r  # the same exit head after every loop
    return confidence(head(x_BTD)) < self.threshold

  def decide_rows(self, core, x_RD: Array, next_R: Array, head: Head) -> tuple[Array, Array]:
    """For tokens at different loops (the depth-wise engine): whether each runs loop next_R
    (0-based: next_R loops already run) and its combine weight (1)."""
    del core
    more_R = self.decide(x_RD[:, None], 1, head)[:, 0]  # the head reads [B, T, D]
    go_R = (next_R == 0) | ((next_R < self.num_recursions) & more_R)
    return go_R, jnp.ones(next_R.shape, jnp.float32)


def make_rule(m: mlc.ConfigDict) -> ConfidenceExit | None:
  """The early-exit rule of model.recursion.exit_threshold (None when 0: every loop runs)."""
  tau = m.recursion.get("exit_threshold", 0.0)
  return ConfidenceExit(float(tau), m.recursion.num_recursions) if tau > 0 else None
