"""The one language model: embed -> prelude -> core -> coda -> final norm -> LM head.

Methods differ only in the core (a plain stack, or the tied recursion of recursion.py; MoR plugs
into the same slot) and in the FFN slot of a block. The model returns logits and a flat dict of
auxiliary outputs (weighted losses under keys starting with "loss/", statistics otherwise).
"""

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from research.model import aux as aux_lib
from research.model import moe, mor, recursion, routers
from research.model.layers import (
    NO_CARRY,
    Block,
    Carry,
    Embed,
    RMSNorm,
    Tokens,
    constrain_activations,
    normal_init,
)

Array = jax.Array


def resolve_dtype(name: str):
  """'auto' is bfloat16 on accelerators and float32 on CPU (bf16 matmuls are emulated there)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


class Stack(nnx.Module):
  """A sequence of independent blocks (the vanilla core)."""

  def __init__(self, blocks: list[Block], *, remat: bool):
    self.blocks = nnx.List(blocks)
    self.remat = remat

  def __call__(self, x_BTD: Array, tok: Tokens) -> tuple[Array, dict]:
    """(output, the blocks' aux summed by aux.add_aux)."""
    return self.forward(x_BTD, tok)[:2]

  def forward(self, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY
              ) -> tuple[Array, dict, Carry]:
    """(output, summed aux, carry): the carry goes from block to block (layers.Carry)."""
    auxes = []
    for block in self.blocks:
      x_BTD, aux, carry = apply_block(block, x_BTD, tok, carry, remat=self.remat)
      auxes.append(aux)
    return x_BTD, aux_lib.add_aux(auxes), carry


def apply_block(block: Block, x_BTD: Array, tok: Tokens, carry: Carry = NO_CARRY, *,
                remat: bool) -> tuple[Array, dict, Carry]:
  """block.forward(x, tok, carry=carry), rematerialised in the backward pass when `remat`."""
  if remat:
    return nnx.remat(lambda blk, x, t, c: blk.forward(x, t, carry=c))(block, x_BTD, tok, carry)
  return block.forward(x_BTD, tok, carry=carry)


class LanguageModel(nnx.Module):
  """Decoder-only LM (Llama layout). `cfg` is the `model` section of the config."""

  def __init__(self, cfg: mlc.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = resolve_dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    plan = recursion.make_plan(cfg.recursion.strategy, cfg.num_layers,
                               cfg.recursion.num_recursions)
    remat = cfg.remat == "block"

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    routed_ffn = moe.RoutedFFNs(cfg, **kw)

    def blocks(first: int, n: int) -> list[Block]:
      """Unique layers first..first+n-1, routed where moe.is_moe_layer says so."""
      return [Block(cfg, **kw, ffn=routed_ffn(i)) for i in range(first, first + n)]

    self.prelude = Stack(blocks(0, plan.prelude), remat=remat)
    shared = blocks(plan.prelude, plan.num_shared)
    if cfg.recursion.strategy == "none":
      self.core = Stack(shared, remat=remat)
    elif cfg.mor.kind != "none":
      self.core = mor.MoR(plan, shared, cfg, remat=remat, param_dtype=param_dtype, rngs=rngs)
    else:
      self.core = recursion.Recursion(plan, shared, cfg, remat=remat, param_dtype=param_dtype,
                                      rngs=rngs)
    self.coda = Stack(blocks(plan.prelude + plan.num_shared, plan.coda), remat=remat)
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False,
                             kernel_init=normal_init(cfg.init_std, ("embed", "vocab")),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # optimizer steps seen, for ReXMoE's PSR schedule (moe.py); rewritten by the train step
    self.step_counter = (routers.Counter(jnp.zeros((), jnp.int32)) if moe.uses_step(cfg)
                         else None)

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segments_BT: Array | None = None, *, exits: bool = False
               ) -> tuple[Array | list[Array], dict]:
    """Float32 logits [B, T, V] and the aux dict. With `exits` (a recursive core), a list of
    logits, one per loop: the final norm and LM head on the hidden state after each loop (RRT
    §2.4 early exits; the coda runs only on the last), the last entry being the usual output.
    The aux of the prelude, core and coda are merged by one rule (aux.add_aux, then
    aux.mean_over_layers: MoE entries are means over the MoE layers)."""
    x_BTD, tok, pre_aux, carry = self.inputs(tokens_BT, positions_BT, segments_BT)
    if exits:
      if not isinstance(self.core, recursion.Recursion):
        raise ValueError("early exits need a recursive core (config.model.recursion.strategy "
                         "cycle | middle_cycle, config.model.mor.kind='none')")
      loops, aux, carry = self.core.loop_outputs(x_BTD, tok, carry)
      x_BTD, coda_aux, _ = self.coda.forward(loops[-1], tok, carry)
      logits = [self.logits(h_BTD) for h_BTD in loops[:-1]] + [self.logits(x_BTD)]
    else:
      if isinstance(self.core, mor.MoR):  # no MoE in a MoR core (config.py): the carry passes
        (x_BTD, aux), carry = self.core(x_BTD, tok), carry
      else:
        x_BTD, aux, carry = self.core.forward(x_BTD, tok, carry)
      x_BTD, coda_aux, _ = self.coda.forward(x_BTD, tok, carry)
      logits = self.logits(x_BTD)
    aux = aux_lib.mean_over_layers(aux_lib.add_aux([pre_aux, aux, coda_aux]))
    if self.step_counter is not None:
      aux["update/step_counter"] = self.step_counter[...] + 1
    return logits, aux

  def core_inputs(self, tokens_BT: Array, positions_BT: Array | None = None,
                  segments_BT: Array | None = None) -> tuple[Array, Tokens]:
    """The hidden states entering the core and the tokens' metadata (`inputs` without aux)."""
    return self.inputs(tokens_BT, positions_BT, segments_BT)[:2]

  def inputs(self, tokens_BT: Array, positions_BT: Array | None = None,
             segments_BT: Array | None = None) -> tuple[Array, Tokens, dict, Carry]:
    """The hidden states entering the core (embedding, then the prelude layers), the tokens'
    metadata (positions default to 0..T-1, segments to one document per row), the prelude's
    aux and the carry leaving it (layers.Carry)."""
    b, t = tokens_BT.shape
    indices_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    tok = Tokens(positions=indices_BT if positions_BT is None else positions_BT,
                 segments=jnp.ones_like(tokens_BT) if segments_BT is None else segments_BT,
                 indices=indices_BT)
    x_BTD = constrain_activations(self.embed(tokens_BT))
    step = None if self.step_counter is None else self.step_counter[...]
    x_BTD, aux, carry = self.prelude.forward(x_BTD, tok, Carry(step=step))
    return x_BTD, tok, aux, carry

  def logits(self, x_BTD: Array) -> Array:
    """The exit head: final norm then the (tied or untied) LM head, float32 [B, T, V]."""
    x_BTD = self.norm(x_BTD)
    if self.head is None:
      return self.embed.attend(x_BTD)
    return self.head(x_BTD).astype(jnp.float32)
