"""bench/mor_train_throughput.py at tiny shapes: the output's structure, and analytic ratios that
are flops.py's for the experiment configs (configs/vanilla.py, recursive.py, mor.py). No timing
is checked."""

import json

import pytest

from bench import mor_train_throughput as bench
from configs import mor as mor_configs
from configs import recursive as recursive_configs
from configs import vanilla as vanilla_configs
from research import config as config_lib
from research.model import mor as mor_lib
from research.train import flops

T, STEPS = 32, 2
# exact_buckets 2 (not the default 8): the token-choice step compiles 2 branches, not 8
SETS = ["model.d_model=32", "model.d_ff=64", "model.mor.token.exact_buckets=2"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  """One run of the bench's main at T=32, d=32: (its JSON, its printed output)."""
  path = tmp_path_factory.mktemp("bench") / "mor.json"
  printed = []
  bench.main(["bench", "--preset=tiny", f"--seq_len={T}", "--batch=2", "--nr=3",
              f"--steps={STEPS}", "--warmup=0", *(f"--set={s}" for s in SETS), "--pieces",
              f"--json={path}"], out=printed.append)
  return json.loads(path.read_text()), "\n".join(printed)


def experiment_configs():
  """The tiny vanilla / recursive / MoR experiments at the bench's overrides; vanilla at the
  recursive models' unrolled depth."""
  recursive = recursive_configs.get_config("tiny")
  vanilla = vanilla_configs.get_config("tiny")
  vanilla.model.num_layers = recursive.model.num_layers
  out = {}
  share = mor_configs.get_config("tiny,expert")
  share.model.mor.kv = "share"
  for name, c in (("vanilla", vanilla), ("recursive", recursive),
                  ("mor", mor_configs.get_config("tiny,expert")),
                  ("mor_token", mor_configs.get_config("tiny,token")), ("mor_share", share)):
    c.data.seq_len, c.model.d_model, c.model.d_ff = T, 32, 64
    c.model.mor.token.exact_buckets = 2
    config_lib.validate(c)
    out[name] = config_lib.with_derived(c, c.data.bpe_vocab_size).model
  return out


def test_output_has_a_row_per_model_with_times_and_ratios(result):
  res, printed = result
  assert [row["model"] for row in res["rows"]] == list(bench.MODELS)
  assert (res["seq_len"], res["d_model"], res["num_layers"], res["nr"]) == (T, 32, 5, 3)
  for row in res["rows"]:
    assert len(row["times_s"]) == STEPS and min(row["times_s"]) > 0
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    for base in ("vanilla", "recursive"):
      r = row["ratio"][base]
      assert r["per_round_min"] <= r["per_round_max"]
      assert r["gap"] == pytest.approx(r["measured"] / r["exact"] - 1)
    if row["model"] in row["ratio"]:
      assert row["ratio"][row["model"]]["measured"] == pytest.approx(1.0)
  table = printed.splitlines()
  assert sum(line.startswith(f"| {m} |") for line in table for m in bench.MODELS) == 5
  # --pieces: a block and its halves at each MoR step's k_r = floor(c_r T), c = 1, 2/3, 1/3
  assert [p["tokens"] for p in res["pieces"]] == [32, 21, 10]
  for p in res["pieces"]:
    assert min(p["block_s"], p["attention_s"], p["swiglu_s"]) > 0


def test_analytic_ratios_are_flops_py_for_the_experiment_configs(result):
  res, _ = result
  m = experiment_configs()
  for row in res["rows"]:
    for base in ("vanilla", "recursive"):
      r = row["ratio"][base]
      needed, ran = row["step_tokens_needed"], row["step_tokens_ran"]
      for key, count in (
          ("exact", lambda m, t, n=needed: flops.train_flops_per_token(m, t, n)),
          ("bucketed", lambda m, t, n=ran: flops.train_flops_per_token(m, t, n)),
          ("paper", flops.paper_flops_per_token)):
        want = count(m[row["model"]], T) / count(m[base], T)
        assert r[key] == pytest.approx(want, rel=1e-12), (row["model"], base, key)
  by_name = {row["model"]: row for row in res["rows"]}
  assert by_name["mor"]["ratio"]["recursive"]["exact"] < 1  # the gathered steps count fewer
  for name in ("vanilla", "recursive", "mor", "mor_share"):
    assert by_name[name]["step_tokens_needed"] is None
  # exact token choice: step 1 runs every token, later steps what their depths need, in buckets
  needed, ran = by_name["mor_token"]["step_tokens_needed"], by_name["mor_token"]["step_tokens_ran"]
  assert needed[0] == pytest.approx(T) and ran[0] == T
  assert all(n <= k for n, k in zip(needed, ran, strict=True))
  buckets = by_name["mor_token"]["exact_buckets"]
  assert buckets == 2 and set(ran) <= set(mor_lib.exact_sizes(T, buckets))
  assert by_name["mor_token"]["ratio"]["recursive"]["exact"] < 1


def test_compiled_mor_step_executes_fewer_flops_than_the_recursive_one(result):
  res, _ = result
  by_name = {row["model"]: row for row in res["rows"]}
  assert by_name["vanilla"]["compiled_flops_per_step"] > 0
  assert (by_name["mor"]["compiled_flops_per_step"]
          < by_name["recursive"]["compiled_flops_per_step"])
