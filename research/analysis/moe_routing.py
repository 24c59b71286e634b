"""What the experts of a trained MoE-family model (MoE, CoE, RMoE, ReXMoE) do, for
notebooks/moe_routing.ipynb and the sweeps' router statistics (docs/moe.md):

  loaded = routing.load_run("runs/moe_tiny")          # research/analysis/routing.py
  batch = routing.validation_batch(loaded)
  apps = moe_routing.capture(loaded.model, batch)     # one Application per MoE layer call
  moe_routing.expert_load(apps)                       # [applications, E] heatmap
  moe_routing.router_statistics(apps)                 # RMoE's Inner / Outer Balance, entropy, MI

`capture` runs the LM's own forward and records the routing of every MoE application (layer x
depth of a tied core, each CoE iteration) by wrapping `moe.MoE.iterate` for the duration of one
traced call: no model code changes. Statistics count the valid (non-padding) tokens only.
"""

import dataclasses
import html
import itertools
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import routing
from research.model import moe
from research.train import step as step_lib

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Application:
  """One call of an MoE layer: `layer` its index among the model's unique MoE layers (call order
  of first use), `call` its index among all calls, `member` / `group` its ReXMoE place
  (member 0 of group size 1 for a plain MoE), and per CoE iteration t the router logits [B, T, E],
  gates and chosen experts [B, T, K] and the kept assignments; `valid` [B, T]."""

  layer: int
  call: int
  member: int
  group: int
  logits: list[np.ndarray]
  weights: list[np.ndarray]
  experts: list[np.ndarray]
  keep: list[np.ndarray]
  valid: np.ndarray

  @property
  def num_experts(self) -> int:
    return self.logits[0].shape[-1]


@contextmanager
def _recording(calls: list):
  """moe.MoE.iterate wrapped to append (module, its routings) to `calls` while active."""
  original = moe.MoE.iterate

  def iterate(self, x_BTD, valid_BT, **kw):
    out_BTD, rs = original(self, x_BTD, valid_BT, **kw)
    calls.append((self, rs))
    return out_BTD, rs

  moe.MoE.iterate = iterate
  try:
    yield
  finally:
    moe.MoE.iterate = original


def capture(model: nnx.Module, batch: Batch) -> list[Application]:
  """Every MoE application of the model's forward on the inputs of `batch` (its rows without the
  last token), in call order."""
  inputs, positions, segments, _, _ = step_lib.lm_inputs(batch)
  meta = []  # (module id, member, group) per call, filled while tracing

  @nnx.jit
  def run(model, inputs, positions, segments):
    calls = []
    with _recording(calls):
      model(inputs, positions, segments)
    meta[:] = [(id(module), module.member, module.group) for module, _ in calls]
    return [[tuple(r) for r in rs] for _, rs in calls]

  routed = run(model, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segments))
  first = {i: n for n, i in enumerate(dict.fromkeys(m[0] for m in meta))}
  valid_BT = np.asarray(segments) != 0
  apps = []
  for call, ((module_id, member, group), rs) in enumerate(zip(meta, routed, strict=True)):
    rs = [tuple(np.asarray(a) for a in r) for r in rs]
    apps.append(Application(layer=first[module_id], call=call, member=member, group=group,
                            logits=[r[0] for r in rs], weights=[r[1] for r in rs],
                            experts=[r[2] for r in rs], keep=[r[3] for r in rs], valid=valid_BT))
  return apps


def expert_load(apps: list[Application], iteration: int = 0) -> np.ndarray:
  """[applications, E]: fraction of each application's valid assignments (before dropping) that
  chose each expert (routing.load; rows sum to 1)."""
  return np.stack([np.asarray(routing.load(jnp.asarray(a.experts[iteration]),
                                           jnp.asarray(a.valid), a.num_experts)) for a in apps])


def load_over_training(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(steps [S], load [S, E]) of the train records of a metrics.jsonl: "moe/load", the fraction
  of assignments per expert averaged over the MoE layers, at every logged step."""
  rows = [r for r in records if r.get("kind") == "train" and "moe/load" in r]
  if not rows:
    raise ValueError("no train record with moe/load: is this an MoE-family run?")
  return np.array([r["step"] for r in rows]), np.array([r["moe/load"] for r in rows])


def top_expert(app: Application, iteration: int = 0) -> np.ndarray:
  """[B, T]: each token's first choice (the largest gate), -1 at padding."""
  return np.where(app.valid, app.experts[iteration][..., 0], -1)


def top_expert_html(tokenizer, tokens_T: np.ndarray, expert_T: np.ndarray,
                    num_experts: int) -> str:
  """The tokens as HTML, each on the colour of its top expert (hue e / E), the expert in the
  tooltip; padding (-1) unshaded."""
  spans = []
  for token, e in zip(np.asarray(tokens_T), np.asarray(expert_T), strict=True):
    text = html.escape(tokenizer.decode([int(token)])).replace("\n", "&#8629;<br>")
    style = "" if e < 0 else f"background: hsl({360 * int(e) / num_experts:.0f}, 70%, 80%)"
    spans.append(f'<span title="expert {int(e)}" style="{style}">{text}</span>')
  return "<div style='line-height: 1.8; font-family: monospace'>" + "".join(spans) + "</div>"


def _probs(app: Application, iteration: int = 0) -> np.ndarray:
  """Router probabilities [B, T, E]: softmax of the logits (the normalised scores)."""
  return np.asarray(jax.nn.softmax(jnp.asarray(app.logits[iteration], jnp.float32), axis=-1))


def coactivation(app: Application, first: int = 0, second: int = 1) -> np.ndarray:
  """CoE: [E, E] joint frequency of (expert chosen at iteration `first`, expert chosen at
  iteration `second`) over the valid tokens and their k x k choice pairs (sums to 1)."""
  e = app.num_experts
  a_NK = app.experts[first][app.valid]
  b_NK = app.experts[second][app.valid]
  joint = np.zeros((e, e))
  for i in range(a_NK.shape[1]):
    for j in range(b_NK.shape[1]):
      np.add.at(joint, (a_NK[:, i], b_NK[:, j]), 1.0)
  return joint / max(joint.sum(), 1.0)


def inner_balance(app: Application, iteration: int = 0) -> float:
  """RMoE's Inner Balance: mean over valid tokens of p_top1 / p_top2 (1: the top two equal)."""
  p = np.sort(_probs(app, iteration)[app.valid], axis=-1)[:, ::-1]
  return float(np.mean(p[:, 0] / np.maximum(p[:, 1], 1e-12)))


def outer_balance(app: Application, iteration: int = 0) -> float:
  """RMoE's Outer Balance: mean over valid tokens of the sum of the top-k probabilities (k of
  the run)."""
  k = app.experts[iteration].shape[-1]
  p = np.sort(_probs(app, iteration)[app.valid], axis=-1)[:, ::-1]
  return float(np.mean(np.sum(p[:, :k], axis=-1)))


def gate_entropy(app: Application, iteration: int = 0) -> float:
  """Mean over valid tokens of the entropy -sum_e p_e ln p_e of the router distribution (nats;
  at most ln E)."""
  p = _probs(app, iteration)[app.valid]
  return float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-12)), axis=-1)))


def mutual_information(a_NK: np.ndarray, b_NK: np.ndarray, num_a: int, num_b: int) -> float:
  """I(X; Y) in nats of two layers' expert choices over the same N tokens: (X, Y) uniform over
  each token's k_a x k_b choice pairs, I = sum p(x, y) ln(p(x, y) / (p(x) p(y))). A plug-in
  estimate: biased upward when N is small against the number of expert pairs."""
  joint = np.zeros((num_a, num_b))
  for i in range(a_NK.shape[1]):
    for j in range(b_NK.shape[1]):
      np.add.at(joint, (a_NK[:, i], b_NK[:, j]), 1.0)
  joint /= max(joint.sum(), 1.0)
  px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log(joint[nz] / (px @ py)[nz])))


def cross_layer_mi(apps: list[Application]) -> np.ndarray:
  """[applications - 1]: mutual information of the expert choices of consecutive MoE calls
  (call i and i + 1) over the valid tokens (RMoE's cross-layer MI)."""
  return np.array([mutual_information(a.experts[0][a.valid], b.experts[0][b.valid],
                                      a.num_experts, b.num_experts)
                   for a, b in itertools.pairwise(apps)])


def router_statistics(apps: list[Application]) -> dict[str, float]:
  """RMoE paper's router statistics of a run, means over the MoE calls: Inner Balance
  (top1 / top2), Outer Balance (sum of the top-k probabilities), gate entropy, and the mean
  cross-layer mutual information of the expert choices (nan with one call)."""
  mi = cross_layer_mi(apps)
  return {"inner_balance": float(np.mean([inner_balance(a) for a in apps])),
          "outer_balance": float(np.mean([outer_balance(a) for a in apps])),
          "gate_entropy": float(np.mean([gate_entropy(a) for a in apps])),
          "cross_layer_mi": float(np.mean(mi)) if len(mi) else float("nan")}


def pool_usage(app: Application) -> np.ndarray:
  """ReXMoE: [r]: fraction of the call's valid assignments that went to the experts of each
  member of its group (candidate c belongs to member c // E); a plain MoE gives [1.0]."""
  e_local = app.num_experts // app.group
  owner_NK = app.experts[0][app.valid] // e_local
  return np.bincount(owner_NK.reshape(-1), minlength=app.group) / max(owner_NK.size, 1)


def psr_pool_sizes(moe_cfg, steps: np.ndarray) -> np.ndarray:
  """PSR: the routable candidates N_t at each optimizer step (Eq. 6 or stepwise, from N_0 =
  psr_start_experts, routing.psr_num_candidates); r E throughout without PSR."""
  e, r = moe_cfg.num_experts, moe_cfg.rex_group
  first = moe_cfg.get("psr_start_experts", -1)
  if not (moe_cfg.psr and (r > 1 or first not in (-1, e))):
    return np.full(len(steps), e * r)
  kw = dict(first=first, schedule=moe_cfg.get("psr_schedule", "linear"))
  return np.array([int(routing.psr_num_candidates(jnp.asarray(s), e, r, moe_cfg.psr_start,
                                                  moe_cfg.psr_end, **kw)) for s in steps])
