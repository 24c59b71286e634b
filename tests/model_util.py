"""Small configs shared by the tests."""

import ml_collections as mlc

from configs import base
from research import config as config_lib


def tiny_config(**model) -> mlc.ConfigDict:
  """A validated config with a tiny model (d=32, 2 layers, GQA 4/2, vocab 64), fp32 compute."""
  c = base.get_config()
  c.model.update(dict(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                           compute_dtype="float32"), **model))
  c.data.seq_len = 16
  c.train.update(batch_size=4, steps=10, grad_accum=1)
  config_lib.validate(c)
  return config_lib.with_derived(c, 64)
