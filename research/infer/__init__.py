"""Inference: KV-cached autoregressive decoding with causal MoR routing (decode.py) and the
launcher's generate mode (generate.py). docs/inference.md."""
