"""Which tokens a trained MoR model sends how deep (MoR §5, Fig. 5), for notebooks.

  loaded = routing.load_run("runs/mor_tiny")        # newest checkpoint, tokenizer, valid docs
  batch = routing.validation_batch(loaded)          # the first batch evaluation reads
  routes, aux = routing.route(loaded.model, batch)  # mor.Routes: depth [B, T], selected[r] ...
  routing.depth_by_token(loaded.run.tokenizer, batch, routes.depth)

A token's depth is the number of recursion steps it ran (0 for padding). Expert choice routes
with the top-k of the run's config (the rule it was trained with); token choice with its router's
top-1 depth.
"""

import dataclasses
import html
import json
import os
from collections import defaultdict

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from configs import base
from research import config as config_lib
from research.model import mor
from research.model.lm import LanguageModel
from research.train import checkpoint, loop
from research.train import step as step_lib

Batch = dict[str, np.ndarray]


def saved_config(workdir: str) -> mlc.ConfigDict:
  """configs/base.py's defaults overlaid with the run's <workdir>/config.json, in eval mode.

  Keys the run did not save (added to the code later) keep their defaults; a saved key the code
  does not know is an error that names it.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no saved config; was a run trained in {workdir}?")
  with open(path) as f:
    saved = json.load(f)
  cfg = base.get_config()
  _overlay(cfg, saved, path, "")
  cfg.mode = "eval"
  return cfg


def _overlay(cfg: mlc.ConfigDict, saved: dict, path: str, prefix: str) -> None:
  for key, value in saved.items():
    if key not in cfg:
      raise config_lib.ConfigError(
          f"{path}: config key '{prefix}{key}' is unknown to configs/base.py (saved by another "
          "version of the code?)")
    if isinstance(value, dict):
      _overlay(cfg[key], value, path, f"{prefix}{key}.")
    else:
      cfg[key] = tuple(value) if isinstance(cfg[key], tuple) else value


@dataclasses.dataclass
class LoadedRun:
  """A run's model at its newest checkpoint, with the run (config, tokenizer, documents)."""

  model: LanguageModel
  run: loop.Run
  step: int


def load_run(workdir: str, model_overrides: dict | None = None) -> LoadedRun:
  """The newest readable checkpoint in <workdir>/checkpoints, built with the run's saved config
  and `model_overrides` (dotted keys under config.model that change no parameter, e.g.
  {"recursion.exit_threshold": 0.9}; checked like the config)."""
  cfg = saved_config(workdir)
  for key, value in (model_overrides or {}).items():
    parent, _, leaf = f"model.{key}".rpartition(".")
    config_lib.lookup(cfg, parent)[leaf] = value
  if model_overrides:
    config_lib.validate(cfg)
  cfg.checkpoint.restore_from = ""  # the run's own checkpoints, not the one it started from
  run = loop.setup(cfg, workdir)
  mngr = checkpoint.open_manager(os.path.join(workdir, "checkpoints"))
  try:
    if not mngr.all_steps():
      raise config_lib.ConfigError(f"{workdir}/checkpoints holds no checkpoint to analyse")
    state, step, _ = loop.restore_or_init(run, mngr, for_eval=True)
  finally:
    mngr.close()
  return LoadedRun(nnx.merge(run.graphdef, state["params"], state["other"]), run, step)


def validation_batch(loaded: LoadedRun) -> Batch:
  """The first batch the run's evaluation reads: packed rows of T + 1 validation tokens."""
  return next(loop.make_iterator(loaded.run, loaded.run.valid_docs, train=False))


@nnx.jit
def _route(model: LanguageModel, inputs, positions, segments) -> tuple[mor.Routes, dict]:
  x_BTD, tok = model.core_inputs(inputs, positions, segments)
  _, aux, _ = model.core.forward(x_BTD, tok)
  return mor.routes(aux), {k: v for k, v in aux.items() if not k.startswith("route/")}


def route(model: LanguageModel, batch: Batch) -> tuple[mor.Routes, dict]:
  """The MoR core's decisions on the inputs of `batch` (its rows without their last token), and
  its aux dict (per-step BCE, threshold accuracy, score histograms, depth fractions)."""
  if model.core.rule is None:
    raise ValueError("route: the model has no MoR core (config.model.mor.kind is 'none')")
  inputs, positions, segments, _, _ = step_lib.lm_inputs(batch)
  routes, aux = _route(model, inputs, positions, segments)
  return jax.tree.map(np.asarray, routes), jax.tree.map(np.asarray, aux)


def inputs_of(batch: Batch) -> np.ndarray:
  """The token ids [B, T] that `route` reads."""
  return np.asarray(batch["tokens"][:, :-1])


def depth_by_token(tokenizer: Tokenizer, batch: Batch, depth_BT: np.ndarray, *,
                   min_count: int = 5) -> list[tuple[str, int, float]]:
  """(token text, occurrences, mean depth) of each vocabulary entry that occurs at least
  `min_count` times among the batch's real tokens, deepest first."""
  tokens_BT = inputs_of(batch)
  valid_BT = np.asarray(batch["segment_ids"][:, :-1]) != 0
  depths = defaultdict(list)
  for token, depth in zip(tokens_BT[valid_BT], np.asarray(depth_BT)[valid_BT], strict=True):
    depths[int(token)].append(int(depth))
  rows = [(tokenizer.decode([token]), len(d), float(np.mean(d)))
          for token, d in depths.items() if len(d) >= min_count]
  return sorted(rows, key=lambda row: (-row[2], -row[1], row[0]))


def depth_html(tokenizer: Tokenizer, tokens_T: np.ndarray, depth_T: np.ndarray,
               num_recursions: int) -> str:
  """The tokens as HTML, each shaded by its depth (white: 0 steps, dark blue: Nr) with the depth
  in its tooltip."""
  spans = []
  for token, depth in zip(np.asarray(tokens_T), np.asarray(depth_T), strict=True):
    shade = int(depth) / num_recursions
    colour = "white" if shade > 0.6 else "black"
    text = html.escape(tokenizer.decode([int(token)])).replace("\n", "&#8629;<br>")
    spans.append(f'<span title="depth {int(depth)}" style="background: rgba(31, 80, 180, '
                 f'{shade:.2f}); color: {colour}">{text}</span>')
  return "<div style='line-height: 1.8; font-family: monospace'>" + "".join(spans) + "</div>"
