"""Pure train and eval steps over a TrainState pytree.

Loss = token-mean next-token NLL over positions whose target is in the same document, plus every
aux entry of the model whose key starts with "loss/" (already weighted by the model). With
gradient accumulation the micro-batch gradients are summed with weights that make the result
equal to the single big-batch gradient of that loss.

Non-trainable model variables that learn from the data (MoR's loss-free balancing bias, warm-up
counters) change only through the step: the model returns their new values as aux entries
"update/<path>" ("/"-joined path in the model's non-Param state, e.g. "update/core/bias"); the
step averages them over the micro-batches like every aux entry and writes them into
state["other"] after the optimizer update, so a step that is skipped changes none of them.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.model.lm import LanguageModel

TrainState = dict[str, Any]  # step, skipped (i32 scalars), params, other (nnx.State), opt
Batch = dict[str, jax.Array]  # tokens / positions / segment_ids, each [B, T + 1] int32


def lm_inputs(batch: Batch) -> tuple[jax.Array, ...]:
  """(inputs, positions, segments, targets, target mask) from rows of T + 1 tokens."""
  seg = batch["segment_ids"]
  mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
  return (batch["tokens"][:, :-1], batch["positions"][:, :-1], seg[:, :-1],
          batch["tokens"][:, 1:], mask)


def nll_sum(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
  """Summed NLL over the valid targets, their count, and the model's aux dict."""
  inputs, positions, segments, targets, mask = lm_inputs(batch)
  logits_BTV, aux = model(inputs, positions, segments)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets)
  return jnp.sum(nll_BT * mask), jnp.sum(mask), aux


def aux_loss(aux: dict) -> jax.Array:
  return sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros((), jnp.float32))


UPDATE = "update/"  # aux key prefix: the new value of the non-Param variable at the path after it


def with_updates(other: nnx.State, aux: dict) -> nnx.State:
  """`other` with each aux["update/<path>"] written into the variable at <path>."""
  updates = {k[len(UPDATE):]: v for k, v in aux.items() if k.startswith(UPDATE)}
  if not updates:
    return other
  flat = list(nnx.to_flat_state(other))
  names = ["/".join(map(str, path)) for path, _ in flat]
  unknown = set(updates) - set(names)
  if unknown:
    raise KeyError(f"aux update keys {sorted(unknown)} name no non-Param variable of the model")
  return nnx.from_flat_state([
      (path, var.replace(updates[name].astype(var.dtype)) if name in updates else var)
      for name, (path, var) in zip(names, flat, strict=True)])


def make_init_state(model_cfg, tx: optax.GradientTransformation):
  """init_state(key) -> a fresh TrainState of LanguageModel(model_cfg); jit it with shardings."""
  def init_state(key: jax.Array) -> TrainState:
    _, params, other = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(key)), nnx.Param, ...)
    return dict(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                params=params, other=other, opt=tx.init(params))

  return init_state


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int, policy: str):
  """Returns train_step(state, batch) -> (state, metrics); jit it with shardings + donation.

  A step whose loss, gradient norm or updated weights are not finite never changes params or
  optimizer state and increments state["skipped"]. policy "skip" still advances the step (the
  batch is consumed); policy "stop" freezes the state from then on, so the loop can save the last
  good state.
  """

  def loss_fn(params, other, micro: Batch, num_targets: jax.Array):
    model = nnx.merge(graphdef, params, other)
    total, count, aux = nll_sum(model, micro)
    loss = total / num_targets + aux_loss(aux) / grad_accum
    return loss, (total, count, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    num_targets = jnp.maximum(jnp.sum(lm_inputs(batch)[-1]), 1)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(grads, micro):
      (_, (total, count, aux)), g = grad_fn(state["params"], state["other"], micro, num_targets)
      return jax.tree.map(jnp.add, grads, g), (total, count, aux)

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, (totals, counts, auxes) = jax.lax.scan(accumulate, zeros, micro_batches)
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes)
    nll = jnp.sum(totals) / jnp.maximum(jnp.sum(counts), 1)
    loss = nll + aux_loss(aux)
    grad_norm = optax.global_norm(grads)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Finite loss and gradient, and an update that did not overflow any weight (checked per
    # leaf: a global norm of huge weights would itself overflow).
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    ok = finite if policy == "skip" else finite & (state["skipped"] == 0)
    new = dict(step=state["step"] + 1, skipped=state["skipped"], params=params,
               other=with_updates(state["other"], aux), opt=opt)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    new["skipped"] = jnp.where(ok, 0, state["skipped"] + 1)
    if policy == "skip":
      new["step"] = state["step"] + 1
    metrics = dict(loss=loss, nll=nll, grad_norm=grad_norm, lr=schedule(state["step"]),
                   targets=jnp.sum(counts), finite=finite, skipped=new["skipped"],
                   **{k: v for k, v in aux.items() if not k.startswith(UPDATE)})
    return new, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef):
  """eval_step(state, batch) -> (summed NLL, number of targets)."""

  def eval_step(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state["params"], state["other"])
    total, count, _ = nll_sum(model, batch)
    return total, count

  return eval_step
