"""research/analysis/routing.py (what the routing notebook reads) and saved-config reloading."""

import json

import numpy as np
import pytest
from flax import nnx

from configs import base
from configs import mor as mor_configs
from research import config as config_lib
from research.analysis import routing
from research.model.lm import LanguageModel
from research.train import loop
from tests.model_util import tiny_config


def save_config(cfg, workdir, drop: tuple[str, ...] = ()) -> None:
  """Writes cfg as the run's config.json, without the dotted keys in `drop`."""
  saved = json.loads(cfg.to_json_best_effort())
  for key in drop:
    *parents, leaf = key.split(".")
    node = saved
    for p in parents:
      node = node[p]
    del node[leaf]
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(saved))


def test_saved_config_round_trips_and_fills_keys_added_since(tmp_path):
  cfg = mor_configs.get_config("tiny")
  cfg.model.mor.capacity = (1.0, 0.5, 0.25)
  save_config(cfg, tmp_path, drop=("model.recursion.early_exit",))
  loaded = routing.saved_config(str(tmp_path))
  assert loaded.model.mor.capacity == (1.0, 0.5, 0.25)  # a tuple again, as the code expects
  assert loaded.model.recursion.early_exit is False  # the default fills the missing key
  loaded.mode = cfg.mode
  assert loaded.to_dict() == cfg.to_dict()


def test_saved_config_names_a_key_the_code_does_not_know(tmp_path):
  saved = json.loads(base.get_config().to_json_best_effort())
  saved["model"]["num_expertz"] = 4
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match=r"config.json: config key 'model.num_expertz'"):
    routing.saved_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no saved config"):
    routing.saved_config(str(tmp_path / "nowhere"))


def test_workdir_check_treats_a_missing_key_as_its_default(tmp_path):
  cfg = base.get_config()
  cfg.mode = "eval"  # compare only, write nothing
  save_config(cfg, tmp_path, drop=("model.recursion.lora_merged",))
  loop.check_workdir_config(cfg, str(tmp_path))  # lora_merged=False is the default: accepted
  cfg.model.recursion.lora_merged = True
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.recursion.lora_merged: False -> True"):
    loop.check_workdir_config(cfg, str(tmp_path))


def tiny_mor(kind: str) -> LanguageModel:
  """Middle-cycle MoR, Nr = 3 over 5 layers (1 + 1 x 3 + 1), of the tests' tiny shape."""
  cfg = mor_configs.set_design(tiny_config(num_layers=5), kind)
  return LanguageModel(cfg.model, rngs=nnx.Rngs(0))


def packed_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Two rows of 17 tokens: two documents in row 0, one document then padding in row 1."""
  segments = np.array([[1] * 9 + [2] * 8, [1] * 12 + [0] * 5], np.int32)
  positions = np.array([list(range(9)) + list(range(8)), list(range(12)) + [0] * 5], np.int32)
  tokens = rng.integers(1, 64, segments.shape).astype(np.int32) * (segments != 0)
  return {"tokens": tokens, "positions": positions, "segment_ids": segments}


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_route_matches_the_model_forward(kind, mesh):
  model = tiny_mor(kind)
  batch = packed_batch(np.random.default_rng(0))
  routes, aux = routing.route(model, batch)
  inputs = routing.inputs_of(batch)
  _, model_aux, _ = nnx.jit(lambda m, *a: m(*a))(model, inputs, batch["positions"][:, :-1],
                                                batch["segment_ids"][:, :-1])
  np.testing.assert_allclose(aux["mor/depth_frac"], model_aux["mor/depth_frac"], rtol=1e-6)
  valid = batch["segment_ids"][:, :-1] != 0
  assert routes.depth.shape == inputs.shape
  assert np.all(routes.depth[~valid] == 0) and np.all(routes.depth[valid] >= 1)
  np.testing.assert_array_equal(routes.depth, np.sum(np.stack(routes.selected), axis=0))


def test_route_refuses_a_model_without_routers(mesh):
  model = LanguageModel(tiny_config().model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no MoR core"):
    routing.route(model, packed_batch(np.random.default_rng(0)))


class CharTokenizer:
  """decode([i]) = chr(ord('a') + i), like tokenizers.Tokenizer.decode on one id."""

  def decode(self, ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_depth_by_token_averages_real_tokens_only():
  tokens = np.array([[0, 1, 0, 1, 2, 9]])  # the last column is a target, not an input
  segments = np.array([[1, 1, 1, 1, 0, 0]])
  depth = np.array([[3, 1, 2, 1, 0]])
  rows = routing.depth_by_token(CharTokenizer(), {"tokens": tokens, "segment_ids": segments},
                                depth, min_count=2)
  assert rows == [("a", 2, 2.5), ("b", 2, 1.0)]  # "c" is padding


def test_depth_html_escapes_and_shades_each_token():
  out = routing.depth_html(CharTokenizer(), np.array([1, 0]), np.array([3, 0]), 3)
  assert out.count("<span") == 2
  assert 'title="depth 3" style="background: rgba(31, 80, 180, 1.00)' in out
  assert 'title="depth 0" style="background: rgba(31, 80, 180, 0.00)' in out
  out = routing.depth_html(CharTokenizer(), np.array([ord("<") - ord("a")]), np.array([1]), 3)
  assert "&lt;" in out and "<</span>" not in out
