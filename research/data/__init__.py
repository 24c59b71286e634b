"""Embedded corpus, tokenizers, grain pipelines and real-dataset readers."""
