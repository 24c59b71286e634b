"""Size presets shared by the experiment configs: `--config=configs/<exp>.py:<preset>`.

tiny and small run on a 2-core CPU; 135m and 360m are the SmolLM shapes of the MoR paper
(docs/methods/mor.md Table 6) with the paper's batch (1024 x 2048 tokens) and optimiser.
"""

import ml_collections as mlc

MODELS = {
    #        d_model layers heads kv  d_ff
    "tiny": (128, 4, 4, 2, 384),
    "small": (256, 8, 8, 4, 768),
    "135m": (576, 30, 9, 3, 1536),
    "360m": (960, 32, 15, 5, 2560),
}

# tiny and small train on the embedded corpus (2.6M training tokens at BPE 1024): a window of
# 32768 rows holds more than an epoch, so every row of an epoch is shuffled with every other and
# the last steps before an evaluation see the whole corpus, not a few plays (seed spread 0.02
# instead of 0.16, docs/results/seed_spread.md). It costs ~10 s of tokenizing before step 1.
EPOCH_WINDOW = 32768


def apply(c: mlc.ConfigDict, preset: str | None) -> mlc.ConfigDict:
  """Sets the model shape and a matching data/train budget for `preset` (default: tiny)."""
  preset = preset or "tiny"
  if preset not in MODELS:
    raise ValueError(f"unknown preset {preset!r} in --config=...:{preset}; "
                     f"choose one of {', '.join(MODELS)}")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff = MODELS[preset]
  if preset == "tiny":
    c.data.seq_len, c.data.bpe_vocab_size = 128, 1024
    c.train.batch_size, c.train.steps, c.train.lr = 16, 300, 3e-3
    # The whole held-out split (61 documents, 128k tokens): its first 8 batches are one play.
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 100, -1, 10
    c.data.shuffle_window = EPOCH_WINDOW
    c.checkpoint.every = 100
  elif preset == "small":
    c.data.seq_len, c.data.bpe_vocab_size = 256, 8192
    c.train.batch_size, c.train.steps, c.train.lr = 16, 2000, 3e-3
    c.train.eval_every, c.train.eval_batches = 250, -1  # the whole held-out split
    c.data.shuffle_window = EPOCH_WINDOW
    c.checkpoint.every = 250
  else:  # the paper's scale: FineWeb-Edu shards brought by the user, SmolLM-size vocabulary
    c.data.seq_len, c.data.bpe_vocab_size = 2048, 49152
    c.train.batch_size, c.train.grad_accum, c.train.lr = 1024, 16, 3e-3
    c.train.steps, c.train.eval_every, c.train.eval_batches = 10_000, 1000, 64
    c.checkpoint.every = 500
    c.model.vocab_multiple = 128
  return c
