"""Pure train and eval steps over a TrainState pytree.

Loss = token-mean next-token NLL over positions whose target is in the same document, plus every
aux entry of the model whose key starts with "loss/" (already weighted by the model). With
gradient accumulation the micro-batch gradients are summed with weights that make the result
equal to the single big-batch gradient of that loss.

`Objective` adds the RRT terms, each a token mean over the same targets:
  early exits (one per loop, e = 1..E, E = Nr; RRT §3.7, Table 3):
    weighted     sum_e (e / sum_j j) CE_e
    aggressive   CE_E + sum_{e<E} [c CE_e + kd KL(stop_grad(p_E) || p_e)]   (c = 0.1 in RRT;
                 the paper does not give kd or the KL's direction: forward KL, kd = 0.1 here)
  distillation   + lambda KL(p_teacher || p_E), a frozen teacher's logits (RRT App. I, forward KL)

Non-trainable model variables that learn from the data (MoR's loss-free balancing bias, warm-up
counters) change only through the step: the model returns their new values as aux entries
"update/<path>" ("/"-joined path in the model's non-Param state, e.g. "update/core/bias"); the
step averages them over the micro-batches like every aux entry and writes them into
state["other"] after the optimizer update, so a step that is skipped changes none of them.
"""

import dataclasses
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
  logits_BTV, aux, _ = model(inputs, positions, segments)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets)
  return jnp.sum(nll_BT * mask), jnp.sum(mask), aux


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the train step minimises beyond the final NLL (module docstring); built from config
  by `from_config`. `exits` asks the model for one output per loop (also reported in eval)."""

  exits: bool = False
  exit_loss: str = "final"  # final | weighted | aggressive
  exit_coeff: float = 0.1  # aggressive: c, the CE weight of each intermediate exit
  exit_kd_coeff: float = 0.1  # aggressive: weight of KL(stop_grad(p_final) || p_e)
  distill_coeff: float = 0.0  # lambda of KL(p_teacher || p_final); needs a teacher

  @classmethod
  def from_config(cls, cfg) -> "Objective":
    t = cfg.train
    return cls(exits=cfg.model.recursion.early_exit, exit_loss=t.exit_loss,
               exit_coeff=t.exit_coeff, exit_kd_coeff=t.exit_kd_coeff,
               distill_coeff=t.distill.coeff)

  def exit_weights(self, num_exits: int) -> tuple[float, ...]:
    """CE weight of each exit, the last being the final output."""
    if self.exit_loss == "weighted":
      return tuple(e / (num_exits * (num_exits + 1) / 2) for e in range(1, num_exits + 1))
    if self.exit_loss == "aggressive":
      return (self.exit_coeff,) * (num_exits - 1) + (1.0,)
    return (0.0,) * (num_exits - 1) + (1.0,)


def kl_sum(p_logits_BTV: jax.Array, q_logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """sum over masked tokens of KL(p || q) = sum_v p_v (log p_v - log q_v), in float32."""
  log_p = jax.nn.log_softmax(p_logits_BTV.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(q_logits_BTV.astype(jnp.float32), axis=-1)
  kl_BT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.sum(kl_BT * mask_BT)


def objective_sums(model: nnx.Module, batch: Batch, objective: Objective,
                   teacher: nnx.Module | None = None) -> tuple[jax.Array, dict, jax.Array, dict]:
  """(objective summed over targets, summed statistics, number of targets, model aux).

  Statistics: "nll" (final output), "nll/exit_e" per exit, "kd/exit_e" and "distill_kl" when
  they are in the objective; divide by the number of targets for token means.
  """
  inputs, positions, segments, targets, mask = lm_inputs(batch)
  if objective.exits:
    logits, aux, _ = model(inputs, positions, segments, exits=True)
  else:
    logits, aux, _ = model(inputs, positions, segments)
    logits = [logits]
  ce = lambda l_BTV: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(l_BTV, targets) * mask)
  nlls = [ce(l_BTV) for l_BTV in logits]
  total = sum(w * n for w, n in zip(objective.exit_weights(len(nlls)), nlls, strict=True))
  sums = {"nll": nlls[-1]}
  if objective.exits:
    sums.update({f"nll/exit_{e}": n for e, n in enumerate(nlls, start=1)})
  if objective.exit_loss == "aggressive" and objective.exit_kd_coeff:
    final_BTV = jax.lax.stop_gradient(logits[-1])
    for e, l_BTV in enumerate(logits[:-1], start=1):
      sums[f"kd/exit_{e}"] = kl_sum(final_BTV, l_BTV, mask)
      total = total + objective.exit_kd_coeff * sums[f"kd/exit_{e}"]
  if teacher is not None and objective.distill_coeff:
    teacher_BTV = jax.lax.stop_gradient(teacher(inputs, positions, segments)[0])
    sums["distill_kl"] = kl_sum(teacher_BTV, logits[-1], mask)
    total = total + objective.distill_coeff * sums["distill_kl"]
  return total, sums, jnp.sum(mask), aux


def aux_loss(aux: dict) -> jax.Array:
  return sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros((), jnp.float32))


UPDATE = "update/"  # aux key prefix: the new value of the non-Param variable at the path after it
ROUTE = "route/"  # aux key prefix: routing decisions (research/model/mor.py routes), for analysis


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
                    schedule: optax.Schedule, grad_accum: int, policy: str,
                    objective: Objective = Objective(),
                    teacher_graphdef: nnx.GraphDef | None = None):
  """Returns train_step(state, batch[, teacher_params]) -> (state, metrics); jit it with
  shardings + donation of the state. `teacher_params` (frozen, never updated) is an argument
  exactly when `teacher_graphdef` is given.

  A step whose loss, gradient norm or updated weights are not finite never changes params or
  optimizer state and increments state["skipped"]. policy "skip" still advances the step (the
  batch is consumed); policy "stop" freezes the state from then on, so the loop can save the last
  good state.
  """

  def loss_fn(params, other, micro: Batch, num_targets: jax.Array, teacher_params):
    model = nnx.merge(graphdef, params, other)
    teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_params)
    total, sums, count, aux = objective_sums(model, micro, objective, teacher)
    aux = {k: v for k, v in aux.items() if not k.startswith(ROUTE)}  # decisions: not metrics
    loss = total / num_targets + aux_loss(aux) / grad_accum
    return loss, (total, sums, count, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch, teacher_params=None
                 ) -> tuple[TrainState, dict]:
    if (teacher_params is None) != (teacher_graphdef is None):
      raise ValueError("pass teacher_params exactly when make_train_step got a teacher_graphdef")
    num_targets = jnp.maximum(jnp.sum(lm_inputs(batch)[-1]), 1)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(grads, micro):
      (_, stats), g = grad_fn(state["params"], state["other"], micro, num_targets,
                              teacher_params)
      return jax.tree.map(jnp.add, grads, g), stats

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, (totals, sums, counts, auxes) = jax.lax.scan(accumulate, zeros, micro_batches)
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes)
    count = jnp.maximum(jnp.sum(counts), 1)
    means = {k: jnp.sum(v) / count for k, v in sums.items()}
    loss = jnp.sum(totals) / count + aux_loss(aux)
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
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   targets=jnp.sum(counts), finite=finite, skipped=new["skipped"], **means,
                   **{k: v for k, v in aux.items() if not k.startswith(UPDATE)})
    return new, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective = Objective()):
  """eval_step(state, batch) -> (summed statistics, number of targets): "nll" of the final
  output, and "nll/exit_e" of every exit when `objective.exits`."""
  nll_only = Objective(exits=objective.exits)

  def eval_step(state: TrainState, batch: Batch) -> tuple[dict, jax.Array]:
    model = nnx.merge(graphdef, state["params"], state["other"])
    _, sums, count, _ = objective_sums(model, batch, nll_only)
    return sums, count

  return eval_step
