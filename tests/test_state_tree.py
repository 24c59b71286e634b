"""Checkpoints written before the one-recursion-core refactor still restore: the model's state tree
(every path, variable type and shape) is the one that code built. The expected trees in
tests/data/state_trees_before_one_core.json were recorded from commit fb01fa2 (the separate MoR
core and Stack core) with the same configs as below."""

import json
import os

import pytest
from flax import nnx

from research.model.lm import LanguageModel
from tests.model_util import tiny_config, with_mor

MC3 = dict(strategy="middle_cycle", num_recursions=3)
GRU_MOE = dict(num_experts=4, top_k=2, d_ff=16, router="gru", gru_dim=8)
CASES = {  # name -> (num_layers, model.recursion, dotted model.mor, model.moe)
    "vanilla": (2, {}, {}, {}),
    "relaxed": (4, dict(strategy="cycle", num_recursions=2, lora_rank=4, share_norms=False), {},
                {}),
    "expert_aux_router_warmup": (5, MC3, {"kind": "expert", "expert.sampling": "aux_router",
                                          "expert.cap_warmup_steps": 3}, {}),
    "token_loss_free": (5, MC3, {"kind": "token", "token.balancing": "loss_free",
                                 "router": "mlp"}, {}),
    "moe_rexmoe_psr": (4, {}, {}, dict(num_experts=4, top_k=2, d_ff=16, rex_group=2, psr=True)),
    "rmoe_tied": (4, dict(strategy="cycle", num_recursions=2), {}, GRU_MOE),
}
EXPECTED = os.path.join(os.path.dirname(__file__), "data", "state_trees_before_one_core.json")


def state_tree(layers: int, rec: dict, mor_keys: dict, moe: dict) -> list[str]:
  cfg = tiny_config(num_layers=layers, vocab_size=64)
  cfg.model.recursion.update(rec)
  cfg.model.moe.update(moe)
  cfg = with_mor(cfg, mor_keys)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0)))
  return sorted("/".join(map(str, path)) + ":" + type(v).__name__ + str(tuple(v.shape))
                for path, v in nnx.to_flat_state(nnx.state(model)))


@pytest.mark.parametrize("name", list(CASES))
def test_the_state_tree_is_the_one_older_checkpoints_hold(name):
  with open(EXPECTED) as f:
    expected = json.load(f)[name]
  assert state_tree(*CASES[name]) == expected
