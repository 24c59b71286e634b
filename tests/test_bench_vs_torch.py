"""bench/vs_torch.py's pieces: the shape configs, the Middle-Cycle layer order, the analytic
parameter count against our model's, the missing-torch error; with torch installed (CI has none,
so that test skips), the HF model's parameter count. No timing is checked."""

import json

import jax
import pytest
from flax import nnx

from bench import vs_torch as bench
from research.model.lm import LanguageModel


def our_param_count(m) -> int:
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(m, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("shape", ["8x256", "4x1024", "small"])
@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_shape_configs_and_the_parameter_formula(shape, variant):
  cfg = bench.bench_config(shape, variant)
  m = cfg.model
  if shape == "small":
    assert (m.d_model, m.d_ff, m.num_heads, m.num_kv_heads, m.vocab_size) == (256, 768, 8, 4, 8192)
    assert bench.shape_label(cfg, shape) == "small:16x256"
  else:
    assert {k: m[k] for k in bench.TINY} == bench.TINY
    assert bench.shape_label(cfg, shape) == shape
  assert m.num_layers == 8 and m.head_dim == m.d_model // m.num_heads and m.tie_embeddings
  assert m.compute_dtype == "float32" and cfg.train.grad_accum == 1
  d, f, v, u = m.d_model, m.d_ff, m.vocab_size, len(set(bench.layer_order(m)))
  # q, o: d x d; k, v: d x d/2 (GQA, 2 query heads per kv head); SwiGLU 3 d f; two norms
  per_layer = 2 * d * d + 2 * d * (d // 2) + 3 * d * f + 2 * d
  assert bench.param_count(m) == v * d + u * per_layer + d == our_param_count(m)
  hf = bench.hf_config_kwargs(m)
  assert hf["num_hidden_layers"] == u and hf["tie_word_embeddings"]
  assert hf["initializer_range"] == m.init_std == 0.02


def test_middle_cycle_layer_order():
  assert bench.layer_order(bench.bench_config("8x256", "vanilla").model) == list(range(8))
  assert bench.layer_order(bench.bench_config("8x256", "recursive").model) == [
      0, 1, 2, 1, 2, 1, 2, 3]


def test_missing_torch_prints_one_error_line_and_exits_nonzero(monkeypatch, capsys):
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["vs_torch"])
  assert exit_info.value.code != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "requirements-bench.txt" in err[0]


@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_torch_model_has_our_parameter_count(variant):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  m = bench.bench_config("8x256", variant).model
  model = bench.torch_model(m)
  assert sum(p.numel() for p in model.parameters()) == our_param_count(m)
  assert len(model.model.layers) == 8
  ids = [id(layer) for layer in model.model.layers]
  unique = list(dict.fromkeys(ids))  # the modules in order of first use
  assert [unique.index(i) for i in ids] == bench.layer_order(m)


def test_ours_only_runs_without_torch(monkeypatch, tmp_path):
  """--ours_only (device_check.sh's part): our step alone, its time and MFU, no torch import."""
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  path = tmp_path / "ours.json"
  printed = []
  bench.main(["vs_torch", "--ours_only", "--shapes=2x32", "--variants=recursive", "--rounds=1",
              "--warmup=0", f"--json={path}"], out=printed.append)
  (row,) = json.loads(path.read_text())["rows"]
  assert (row["variant"], row["shape"], row["dtype"]) == ("recursive", "2x32", "float32")
  assert row["ours_ms"] > 0 and 0 < row["mfu"] < 1
  assert "| recursive | 2x32 | float32 |" in printed[-1]


def test_matmul_shapes_are_the_steps_projections():
  """Forward, input-gradient and weight-gradient products of each projection, once each: at
  8 x 256 tokens = 2048, d 128, q/o 128 wide, k/v 64, d_ff 344, vocab 512."""
  shapes = bench.matmul_shapes(bench.bench_config("8x256", "vanilla"))
  assert [s[0] for s in shapes[:2]] == ["q, o fwd", "q, o dW"]  # dx: the forward's shape
  mkn = {s[1:] for s in shapes}
  assert len(mkn) == len(shapes)  # distinct
  assert (2048, 128, 128) in mkn and (128, 2048, 128) in mkn  # q: forward (= dx), dW
  assert {(2048, 128, 344), (2048, 344, 128), (128, 2048, 344), (344, 2048, 128)} <= mkn
  assert (2048, 128, 512) in mkn and (2048, 512, 128) in mkn  # the tied head
  assert (2048, 128, 64) in mkn and (128, 2048, 64) in mkn  # k, v
