"""research/analysis/moe_routing.py: the captured routing equals the layers' own (by hand), for
plain, tied, CoE and ReXMoE models; every statistic against a hand computation."""

import os
import subprocess
import sys

import jax
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import sweep
from research.analysis import moe_router_table, moe_routing, routing
from research.model.lm import LanguageModel
from research.train import loop
from tests import launch_util
from tests.model_util import random_batch, tiny_config

E = 4


def model_and_batch(**model_keys):
  cfg = tiny_config(**dict(dict(moe=dict(num_experts=E, top_k=2, d_ff=16)), **model_keys))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  batch = random_batch(2)
  batch["segment_ids"] = batch["segment_ids"].at[1, -4:].set(0)
  return model, batch


def app(experts, logits=None, valid=None, group=1, member=0):
  """A hand-made Application with one iteration per entry of `experts` ([B, T, K] lists)."""
  experts = [np.asarray(e) for e in experts]
  shape = experts[0].shape
  logits = [np.zeros((*shape[:2], E))] * len(experts) if logits is None else logits
  valid = np.ones(shape[:2], bool) if valid is None else np.asarray(valid)
  return moe_routing.Application(layer=0, call=0, member=member, group=group,
                                 logits=[np.asarray(x) for x in logits],
                                 weights=[np.ones(shape)] * len(experts), experts=experts,
                                 keep=[np.ones(shape, bool)] * len(experts), valid=valid)


def test_capture_equals_each_layers_router_by_hand():
  model, batch = model_and_batch()
  apps = moe_routing.capture(model, batch)
  assert [(a.layer, a.call, a.group) for a in apps] == [(0, 0, 1), (1, 1, 1)]
  tokens, positions = batch["tokens"][:, :-1], batch["positions"][:, :-1]
  segments = batch["segment_ids"][:, :-1]

  @nnx.jit
  def by_hand(model):
    x_BTD, tok = model.core_inputs(tokens, positions, segments)
    logits = []
    for block in model.core.blocks:
      h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
      logits.append(block.ffn.router(block.ffn_norm(h_BTD), 0))
      x_BTD = block.forward(x_BTD, tok)[0]
    return logits

  for a, logits in zip(apps, by_hand(model), strict=True):
    np.testing.assert_allclose(a.logits[0], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.experts[0], jax.lax.top_k(jax.nn.softmax(logits), 2)[1])
  np.testing.assert_array_equal(apps[0].valid, np.asarray(segments) != 0)
  assert moe_routing.top_expert(apps[0])[1, -1] == -1  # padding


def test_capture_tied_coe_and_rexmoe_layers():
  model, batch = model_and_batch(num_layers=4, recursion=dict(strategy="cycle",
                                                              num_recursions=2))
  assert [a.layer for a in moe_routing.capture(model, batch)] == [0, 1, 0, 1]  # 2 depths
  model, batch = model_and_batch(moe=dict(num_experts=E, top_k=1, d_ff=16, iterations=2))
  apps = moe_routing.capture(model, batch)
  assert len(apps) == 2 and all(len(a.experts) == 2 for a in apps)
  assert not np.array_equal(apps[0].logits[0], apps[0].logits[1])  # own router per iteration
  model, batch = model_and_batch(moe=dict(num_experts=E, top_k=2, d_ff=16, rex_group=2))
  apps = moe_routing.capture(model, batch)
  assert [(a.member, a.group, a.num_experts) for a in apps] == [(0, 2, 2 * E), (1, 2, 2 * E)]
  for a in apps:
    usage = moe_routing.pool_usage(a)
    owners = a.experts[0][a.valid] // E
    np.testing.assert_allclose(usage, [np.mean(owners == 0), np.mean(owners == 1)])


def test_expert_load_and_load_over_training():
  a = app([[[[0, 1], [1, 2], [3, 3]]]], valid=[[True, True, False]])
  np.testing.assert_allclose(moe_routing.expert_load([a]), [[0.25, 0.5, 0.25, 0.0]])
  records = [{"kind": "train", "step": 1, "moe/load": [0.5, 0.5]}, {"kind": "valid", "step": 1},
             {"kind": "train", "step": 2, "moe/load": [0.25, 0.75]}]
  steps, load = moe_routing.load_over_training(records)
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_allclose(load, [[0.5, 0.5], [0.25, 0.75]])


def test_coactivation_by_hand():
  # two tokens, top-1 at each of 2 iterations: (0 -> 2), (1 -> 2); a padding token (3 -> 3)
  a = app([[[[0], [1], [3]]], [[[2], [2], [3]]]], valid=[[True, True, False]])
  want = np.zeros((E, E))
  want[0, 2] = want[1, 2] = 0.5
  np.testing.assert_allclose(moe_routing.coactivation(a), want)


def test_router_statistics_by_hand():
  # token 0: p = (0.5, 0.25, 0.125, 0.125); token 1: uniform. k = 2.
  p = np.array([[[0.5, 0.25, 0.125, 0.125], [0.25] * 4]])
  a = app([[[[0, 1], [0, 1]]]], logits=[np.log(p)])
  np.testing.assert_allclose(moe_routing.inner_balance(a), (2.0 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(moe_routing.outer_balance(a), (0.75 + 0.5) / 2, rtol=1e-6)
  h0 = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 2 * 0.125 * np.log(0.125))
  np.testing.assert_allclose(moe_routing.gate_entropy(a), (h0 + np.log(4)) / 2, rtol=1e-6)


def test_mutual_information_by_hand():
  x = np.array([[0], [1], [2], [3]])
  assert abs(moe_routing.mutual_information(x, x, E, E) - np.log(4)) < 1e-9  # identical: H
  y = np.array([[0], [0], [1], [1]])
  z = np.array([[0], [1], [0], [1]])
  assert abs(moe_routing.mutual_information(y, z, 2, 2)) < 1e-12  # independent: 0
  # y determines half of x: I(x; y) = H(y) = ln 2
  assert abs(moe_routing.mutual_information(x, y, E, 2) - np.log(2)) < 1e-9
  a, b = app([x[None]]), app([y[None]])
  np.testing.assert_allclose(moe_routing.cross_layer_mi([a, b, a]), [np.log(2), np.log(2)])
  stats = moe_routing.router_statistics([a, b])
  assert set(stats) == {"inner_balance", "outer_balance", "gate_entropy", "cross_layer_mi"}
  np.testing.assert_allclose(stats["cross_layer_mi"], np.log(2))


def test_psr_pool_sizes_follow_eq6():
  c = mlc.ConfigDict(dict(num_experts=8, rex_group=2, psr=True, psr_start=10, psr_end=30))
  # N = 8 up to t_s, 8 + floor(8 (t - 10) / 20) between, 16 from t_e
  np.testing.assert_array_equal(moe_routing.psr_pool_sizes(c, np.array([0, 10, 15, 20, 30, 99])),
                                [8, 8, 10, 12, 16, 16])
  c.psr = False
  np.testing.assert_array_equal(moe_routing.psr_pool_sizes(c, np.array([0, 50])), [16, 16])
  c = mlc.ConfigDict(dict(num_experts=8, rex_group=1, psr=True, psr_start=10, psr_end=30,
                          psr_start_experts=4, psr_schedule="linear"))  # the R1 control
  np.testing.assert_array_equal(moe_routing.psr_pool_sizes(c, np.array([0, 20, 30])), [4, 6, 8])
  c.update(rex_group=2, psr_start_experts=-1, psr_schedule="stepwise")
  np.testing.assert_array_equal(moe_routing.psr_pool_sizes(c, np.array([9, 10, 30])), [8, 16, 16])


def test_top_expert_html_shades_by_expert():
  class Tok:
    def decode(self, ids):
      return f"<{ids[0]}>"

  out = moe_routing.top_expert_html(Tok(), np.array([5, 6]), np.array([1, -1]), E)
  assert 'title="expert 1" style="background: hsl(90, 70%, 80%)"' in out
  assert "&lt;6&gt;" in out and 'title="expert -1" style=""' in out


# --- research/analysis/moe_router_table.py: the statistics over a sweep's cells ---------------

SWEEP = '''
from research import sweep


def get_sweep(arg=None):
  return [sweep.Cell("gru_seed0", "GRU", dict(seed=0), group="gru"),
          sweep.Cell("gru_seed1", "GRU", dict(seed=1), group="gru"),
          sweep.Cell("linear", "Linear")]
'''


@pytest.fixture(scope="module")
def rmoe_run(tmp_path_factory) -> str:
  """A 2-step RMoE run (GRU router, top-2 of 4 experts) with a checkpoint."""
  path = tmp_path_factory.mktemp("rmoe_table")
  launcher = launch_util.Launcher(path / "shared", config="configs/moe.py:tiny,rmoe")
  result = launcher.run(path / "run", {"train.steps": 2, "model.moe.num_experts": 4,
                                       "model.moe.d_ff": 16, "model.num_layers": 3})
  assert result.returncode == 0, result.stderr
  return str(path / "run")


def test_router_table_concatenates_batches_and_groups_seeds(rmoe_run, tmp_path):
  loaded = routing.load_run(rmoe_run)
  it = loop.make_iterator(loaded.run, loaded.run.valid_docs, train=False)
  first, second = next(it), next(it)
  # one batch: exactly router_statistics of that batch's capture
  one, step = moe_router_table.run_statistics(rmoe_run, batches=1)
  assert step == 2
  assert one == moe_routing.router_statistics(moe_routing.capture(loaded.model, first))
  # two batches: the statistics of the two batches' rows stacked into one batch
  both = {k: np.concatenate([first[k], second[k]]) for k in first}
  two, _ = moe_router_table.run_statistics(rmoe_run, batches=2)
  expected = moe_routing.router_statistics(moe_routing.capture(loaded.model, both))
  assert two.keys() == expected.keys()
  for key in two:
    np.testing.assert_allclose(two[key], expected[key], rtol=1e-5, err_msg=key)
  assert two != one  # the second batch changed something: the test reads both
  # a sweep: both seeds of one cell (the same run twice), the cell without a checkpoint skipped
  spec = tmp_path / "sweep.py"
  spec.write_text(SWEEP)
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  for name in ("gru_seed0", "gru_seed1"):
    os.symlink(rmoe_run, workdir / name)
  cells = sweep.load_sweep(str(spec), None)
  rows = moe_router_table.collect(cells, str(workdir), batches=1)
  assert [(r["group"], r["seed"], r["step"]) for r in rows] == [("gru", 0, 2), ("gru", 1, 2)]
  text = moe_router_table.markdown(rows, "t")
  line = next(x for x in text.splitlines() if x.startswith("| gru |"))
  v = one["inner_balance"]
  assert f"| GRU | 2 | 2 | {v:.3f} ({v:.3f}, {v:.3f}) |" in line
  with pytest.raises(config_lib.ConfigError, match="no cell of the sweep has a checkpoint"):
    moe_router_table.collect(cells, str(tmp_path), batches=1)


def test_router_table_bad_input_is_one_error_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "research.analysis.moe_router_table",
                      "--config=configs/ablations/moe_rmoe.py:tiny", f"--workdir={tmp_path}"],
                     cwd=launch_util.REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --workdir=")
  assert "Traceback" not in r.stderr
