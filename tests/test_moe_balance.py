"""model.moe.balance_form="mixtral": the balance loss pooled over the tokens of all MoE layers
(HF transformers `load_balancing_loss_func`, RMoE's training), against the HF formula written out
by hand in numpy on the layers' router logits; the switch default untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.model import aux as aux_lib
from research.model.lm import LanguageModel
from tests.model_util import random_batch, tiny_config

E, K = 4, 2


def hf_load_balancing_loss(gate_logits: list[np.ndarray], attention_mask: np.ndarray,
                           num_experts: int, top_k: int) -> float:
  """HF transformers' load_balancing_loss_func (Mixtral), transcribed: logits of all layers
  concatenated [L B T, E], softmax, top-k one-hot [L B T, K, E], masked means, E sum(f P)."""
  logits = np.concatenate([g.reshape(-1, num_experts) for g in gate_logits], axis=0)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  selected = np.argsort(-w, axis=-1, kind="stable")[:, :top_k]
  expert_mask = np.eye(num_experts)[selected]  # [LBT, K, E]
  mask = np.tile(attention_mask.reshape(-1), len(gate_logits)).astype(np.float64)
  tokens_per_expert = (expert_mask * mask[:, None, None]).sum(0) / mask.sum()  # [K, E]
  router_prob_per_expert = (w * mask[:, None]).sum(0) / mask.sum()  # [E]
  return float(np.sum(tokens_per_expert * router_prob_per_expert[None, :]) * num_experts)


def run_layers(form: str, zero_router: bool = False):
  """(aux, per-layer logits, valid) of a 2-layer MoE LM; row 1 ends with 5 padding tokens."""
  cfg = tiny_config(moe=dict(num_experts=E, top_k=K, d_ff=16, balance_form=form,
                             balance_coeff=0.1))
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  if zero_router:
    for block in model.core.blocks:
      block.ffn.router.w1[...] = jnp.zeros_like(block.ffn.router.w1[...])
  batch = random_batch(2)
  tokens, positions = batch["tokens"][:, :-1], batch["positions"][:, :-1]
  segments = batch["segment_ids"][:, :-1].at[1, -5:].set(0)

  @nnx.jit
  def run(model):
    _, aux, _ = model(tokens, positions, segments)
    x_BTD, tok = model.core_inputs(tokens, positions, segments)
    logits = []
    for block in model.core.blocks:
      h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), tok)
      logits.append(block.ffn.router(block.ffn_norm(h_BTD), 0))
      x_BTD = block.forward(x_BTD, tok)[0]
    return aux, logits

  aux, logits = run(model)
  return aux, [np.asarray(g, np.float64) for g in logits], np.asarray(segments != 0)


def test_mixtral_form_equals_the_hf_formula_by_hand():
  aux, logits, valid = run_layers("mixtral")
  want = hf_load_balancing_loss(logits, valid, E, K)
  np.testing.assert_allclose(aux["moe/balance_mixtral"], want, rtol=1e-5)
  np.testing.assert_allclose(aux["loss/moe_balance"], 0.1 * want, rtol=1e-5)
  assert abs(want - K) > 1e-3  # not the balanced value: the test can tell the forms apart
  # the per-layer Switch statistic is still reported, and differs from k x itself in general
  switch, _, _ = run_layers("switch")
  np.testing.assert_allclose(aux["moe/balance"], switch["moe/balance"], rtol=1e-6)
  np.testing.assert_allclose(switch["loss/moe_balance"], 0.1 * switch["moe/balance"], rtol=1e-6)
  assert "moe/pool_counts" not in switch and "moe/balance_mixtral" not in switch


def test_mixtral_form_is_k_for_a_uniform_router():
  """p uniform: E sum_e f_e (1/E) = sum_e f_e = k whatever the (tie-broken) choices."""
  aux, logits, valid = run_layers("mixtral", zero_router=True)
  np.testing.assert_allclose(aux["moe/balance_mixtral"], K, rtol=1e-6)
  np.testing.assert_allclose(hf_load_balancing_loss(logits, valid, E, K), K, rtol=1e-6)


def test_pooling_is_not_the_mean_of_per_layer_losses():
  """Two layers with different token counts: the pooled loss weights layers by tokens (HF), the
  mean of per-layer Mixtral losses does not; mean_over_layers forms the pooled one."""
  rng = np.random.default_rng(0)
  parts = []
  for n in (3, 9):
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, n, E)), jnp.float32))
    experts = jax.lax.top_k(probs, K)[1]
    parts.append(dict(aux_lib.pool_statistics(probs, experts, jnp.ones((1, n), bool), 0.5),
                      **{"moe/layers": jnp.float32(1)}))
  merged = aux_lib.mean_over_layers(aux_lib.add_aux(parts))
  per_layer = [float(aux_lib.pooled_balance(p)) for p in parts]
  counts = parts[0]["moe/pool_counts"] + parts[1]["moe/pool_counts"]
  probs_sum = parts[0]["moe/pool_probs"] + parts[1]["moe/pool_probs"]
  want = E * np.sum(np.asarray(counts) / 12 * np.asarray(probs_sum) / 12)
  np.testing.assert_allclose(merged["moe/balance_mixtral"], want, rtol=1e-6)
  np.testing.assert_allclose(merged["loss/moe_balance"], 0.5 * want, rtol=1e-6)
  assert abs(want - np.mean(per_layer)) > 1e-4


@pytest.mark.parametrize("moe_keys,needle", [
    (dict(balance_form="gshard"), "config.model.moe.balance_form='gshard'"),
    (dict(balance_form="mixtral", balance_scope="sequence"),
     "config.model.moe.balance_form='mixtral': pools the tokens of all layers"),
])
def test_invalid_balance_form_names_the_key(moe_keys, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    tiny_config(moe=dict(dict(num_experts=E), **moe_keys))
  assert needle in str(e.value)
