"""bench/inference_throughput.py's pieces at tiny size, no training and no timing: the request
set, B = max from the caches' bytes, the KV bytes per token against the analytic recursion-wise
figure, which engine serves which model, and the table / JSON row schema."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from bench import inference_throughput as bench
from research.infer import engine as engine_lib
from research.model.lm import LanguageModel

LAYERS = 14  # 1 + 12 + 1: Nr = 2, 3 and 4 all divide the middle
SETTINGS = bench.Settings(**dict(bench.QUICK, layers=LAYERS, requests=12))
SHAPE = {"model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2, "model.num_kv_heads": 1,
         "model.vocab_size": 64}


def build(name: str) -> LanguageModel:
  """Bench model `name` at the tiny shape (the bench's config, untrained)."""
  cfg = bench.make_config(name, LAYERS, 1, "/nonexistent", SHAPE)
  cfg.model.head_dim = cfg.model.d_model // cfg.model.num_heads
  with nnx.use_eager_sharding(False):
    return LanguageModel(cfg.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def models() -> dict[str, LanguageModel]:
  return {name: build(name) for name in bench.MODELS}


class FakeTokenizer:
  """Characters as token ids."""

  class Encoded:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text, add_special_tokens=False):
    return self.Encoded([ord(c) % 64 for c in text])


def test_requests_are_the_same_set_with_normal_budgets_within_bounds():
  docs = ["abcdefghij" * 10, "short", "klmnopqrst" * 8]
  s = bench.Settings(**dict(bench.FULL, requests=200))
  reqs = bench.make_requests(docs, FakeTokenizer(), s, seed=3)
  assert reqs == bench.make_requests(docs, FakeTokenizer(), s, seed=3)
  lengths = [len(r.prompt) for r in reqs]
  budgets = np.asarray([r.max_new_tokens for r in reqs])
  assert min(lengths) >= s.prompt_min and max(lengths) <= s.prompt_max
  assert budgets.min() >= s.gen_min and budgets.max() <= s.gen_max
  assert abs(budgets.mean() - s.gen_mean) < 4 and abs(budgets.std() - s.gen_std) < 4
  assert all(r.eos is None for r in reqs) and max(lengths) + budgets.max() <= s.max_len
  assert s.buckets == (16, 32)


def test_batch_max_fills_vanillas_cache_bytes_at_32(models):
  s = SETTINGS
  budget = bench.cache_bytes(models["vanilla"], "sequence", 32, s.max_len)
  assert bench.max_slots(models["vanilla"], "sequence", budget, s.max_len) == 32
  got = {}
  for name in ("mor2", "mor3", "mor4", "mor3_share"):
    kind, _ = bench.serve_plan(name, models[name], s)
    b = bench.max_slots(models[name], kind, budget, s.max_len)
    assert bench.cache_bytes(models[name], kind, b, s.max_len) <= budget
    assert bench.cache_bytes(models[name], kind, b + 1, s.max_len) > budget
    got[name] = b
  # compacted step pools: deeper steps hold fewer entries, more so with more recursions
  assert 32 < got["mor2"] < got["mor3"] < got["mor4"] < got["mor3_share"]


def test_kv_bytes_per_token_of_the_compacted_pools_is_the_analytic_figure(models):
  """K/V bytes of the depth-wise cache per slot entry = (prelude + coda + num_shared sum_r c_r)
  layers of K/V, up to the metadata and ceil() of each step's site length."""
  s = SETTINGS
  for name in ("mor2", "mor3", "mor4"):
    model = models[name]
    lengths = engine_lib.site_lengths(model, s.max_len, compact=True)
    cache = engine_lib.depthwise_cache(model, 4, s.max_len, lengths)
    kv_only = sum(a.nbytes for site in cache.outer.kv.values() for a in (site.k, site.v))
    kv_only += sum(a.nbytes for pool in cache.pools.values() for a in (pool.k, pool.v))
    per_token = kv_only / (4 * s.max_len)
    entry = bench.entry_bytes(model)
    nr, b = model.core.plan.num_recursions, model.core.plan.num_shared
    assert per_token == pytest.approx(entry * (2 + b * sum(lengths) / s.max_len))
    assert bench.kv_layers_analytic(model) == pytest.approx(2 + b * (nr + 1) / 2)
    analytic = entry * bench.kv_layers_analytic(model)
    assert analytic <= per_token <= analytic + entry * b * nr / s.max_len  # ceil of each step
  van = models["vanilla"]
  assert bench.kv_layers_analytic(van) == LAYERS
  assert bench.kv_layers_analytic(models["mor3_share"]) == 2 + 4


def test_serve_plan_names_the_engine_or_why_not(models):
  s = SETTINGS
  plans = {n: bench.serve_plan(n, m, s) for n, m in models.items()}
  assert plans["vanilla"] == ("sequence", "")
  assert all(plans[n] == ("depthwise", "") for n in ("mor2", "mor3", "mor4"))
  assert plans["mor3_share"][0] == "sequence" and "model.mor.kv" in plans["mor3_share"][1]
  assert plans["recursive_exit"] == ("depthwise", "")  # confidence exits (cycle, Nr = 2)
  exit_core = models["recursive_exit"].core
  assert exit_core.plan.num_shared == LAYERS // 2 and exit_core.rule.threshold == 0.5
  assert bench.depth_problem("mor4", 8) and bench.depth_problem("mor3", 8) is None
  assert bench.depth_problem("recursive_exit", 7)
  assert bench.depth_problem("recursive_exit", 8) is None


def test_table_and_json_rows_have_the_issue_schema(models, tmp_path):
  """A result as benchmark() builds it (two rows filled by hand): its JSON round-trips with the
  keys the issue names, and the table prints one line per row ("-" where not served)."""
  rows = [dict(model="vanilla", batch=32, batch_setting="fixed", engine="sequence", note="",
               tokens_per_s=100.0, speedup=1.0, mean_depth=1.0, kv_bytes_per_token=4196.0,
               kv_bytes_per_token_used=4096.0, kv_bytes_per_token_analytic=4096.0),
          dict(model="recursive_exit", batch=32, batch_setting="fixed", engine="not served",
               note="early exit", kv_bytes_per_token=4196.0,
               kv_bytes_per_token_analytic=4096.0)]
  path = tmp_path / "r.json"
  path.write_text(json.dumps({"rows": rows}))
  back = json.loads(path.read_text())["rows"][0]
  for key in ("model", "batch", "tokens_per_s", "speedup", "mean_depth", "kv_bytes_per_token"):
    assert key in back
  table = bench.format_table({"rows": rows}).splitlines()
  assert len(table) == 4 and table[2].startswith("| vanilla | 32 (fixed) | sequence | 100.0 |")
  assert "| recursive_exit | 32 (fixed) | not served | - | - | - |" in table[3]


def test_edge_ab_sizes_are_all_slots_and_the_expected_exits(models):
  """--edge_ab: one compiled edge of all B slots, and of ceil(B / sum_r c_r); the engine built
  with them holds exactly that size."""
  s = SETTINGS
  assert sum(models["mor4"].core.rule.capacity) == pytest.approx(2.5)  # 1, 3/4, 1/2, 1/4
  assert bench.fixed_edges(models["mor4"], 32) == {"edge=32": (32,), "edge=13": (13,)}
  assert bench.fixed_edges(models["mor3"], 32) == {"edge=32": (32,), "edge=16": (16,)}
  engine = bench.make_engine(models["mor3"], "depthwise", 32, s, edge_sizes=(16,))
  assert engine.edge_sizes == (16,)
  assert bench.make_engine(models["mor3"], "depthwise", 32, s).edge_sizes == (8, 16, 32)


def test_map_limit_warning_names_the_sysctl_only_when_the_limit_is_low(tmp_path):
  limit = tmp_path / "max_map_count"
  for value, warns in ((65530, True), (262144, False)):
    limit.write_text(f"{value}\n")
    lines = []
    bench.check_map_limit(21, lines.append, path=str(limit))
    assert bool(lines) == warns
    if warns:
      assert lines[0].startswith("warning:") and "vm.max_map_count is 65530" in lines[0]
  lines = []
  bench.check_map_limit(21, lines.append, path=str(tmp_path / "absent"))
  assert not lines


def test_exit_thresholds_parse_and_label():
  assert bench.parse_thresholds(["0.5"]) == [0.5]
  assert bench.parse_thresholds(["0.5", "0.05"]) == [0.5, 0.05]
  for bad in (["x"], ["0"], ["1.5"], ["0.3", "0.3"]):
    with pytest.raises(bench.app.UsageError, match="--exit_threshold"):
      bench.parse_thresholds(bad)
  assert bench.exit_label("recursive_exit", 0.5, [0.5]) == "recursive_exit"
  assert bench.exit_label("recursive_exit", 0.3, [0.5, 0.3]) == "recursive_exit@0.3"


def test_one_exit_model_served_at_each_threshold(tmp_path):
  """benchmark() end to end at tiny size: the early-exit model is trained once and served at two
  thresholds, a row each. At 1.0 no exit fires (every token runs both loops, as the full
  recursive model); at 0.001 every token leaves after the first loop (any softmax over 512 tokens
  puts at least 1/512 on one), so its realised depth is 1."""
  s = bench.Settings(**dict(bench.QUICK, layers=4, train_steps=1, requests=3, rounds=1,
                            prompt_min=4, prompt_max=6, gen_mean=4.0, gen_std=1.0, gen_min=2,
                            gen_max=6))
  overrides = dict(SHAPE, **{"data.seq_len": 16, "train.batch_size": 2, "data.bpe_vocab_size": 512,
                             "train.eval_batches": 1})
  overrides.pop("model.vocab_size")
  result = bench.benchmark(s, ["recursive_exit"], {}, str(tmp_path), batch=2,
                           overrides=overrides, out=lambda _: None, exit_threshold=[1.0, 0.001])
  fixed = {r["model"]: r for r in result["rows"] if r["batch_setting"] == "fixed"}
  assert set(fixed) == {"vanilla", "recursive_exit@1", "recursive_exit@0.001"}
  assert fixed["recursive_exit@1"]["exit_threshold"] == 1.0
  assert fixed["recursive_exit@1"]["mean_depth"] == pytest.approx(2.0)
  assert fixed["recursive_exit@0.001"]["mean_depth"] == pytest.approx(1.0)
  assert sorted(os.listdir(tmp_path)) == ["data", "recursive_exit", "vanilla"]  # trained once


def test_a_config_error_in_a_bench_is_one_error_line(capsys):
  """bench.synthetic.run's guard: a workdir holding another run's config (as here) or a bad
  --set ends the bench with one `error:` line and status 2, not a traceback."""
  from bench import synthetic
  from research import config as config_lib

  def main(argv):
    raise config_lib.ConfigError("runs/x/vanilla holds a run with a different config")

  with pytest.raises(SystemExit) as exit_info:
    synthetic.config_errors(main)(["bench"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: runs/x/vanilla holds a run with a different config\n"
