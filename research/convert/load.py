"""One entry point: a pretrained Llama (HF directory or .gguf file) -> our LanguageModel."""

import functools
import operator

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from research import config
from research.convert import gguf_llama, hf_llama
from research.model.lm import LanguageModel


def read_pretrained(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(our config.model overrides, float32 HF-named tensors) of a .gguf file or an HF directory."""
  if path.endswith(".gguf"):
    return gguf_llama.load_gguf_llama(path)
  return hf_llama.load_hf_llama(path)


def build_model_from_pretrained(path: str, base_model_cfg: mlc.ConfigDict
                                ) -> tuple[mlc.ConfigDict, LanguageModel]:
  """`base_model_cfg` with the checkpoint's architecture keys, and the model holding its weights.

  The weights live on the default device, unsharded; their logical axis names are kept, so
  `nnx.get_named_sharding` can place them on a mesh.
  """
  overrides, params_hf = read_pretrained(path)
  return build_model(overrides, params_hf, base_model_cfg, source=path)


def build_model(overrides: dict, params_hf: dict[str, np.ndarray], base_model_cfg: mlc.ConfigDict,
                source: str = "params_hf") -> tuple[mlc.ConfigDict, LanguageModel]:
  """As `build_model_from_pretrained`, from what `read_pretrained` returned."""
  cfg = mlc.ConfigDict(base_model_cfg.to_dict())
  cfg.update(overrides)
  config.validate_model(mlc.ConfigDict({"model": cfg}))
  params = hf_llama.hf_to_ours(params_hf, cfg.num_layers, cfg.tie_embeddings)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  expected = nnx.to_pure_dict(state)
  for path_keys, name, transposed in hf_llama.name_map(cfg.num_layers, cfg.tie_embeddings):
    want = functools.reduce(operator.getitem, path_keys, expected).shape
    want = want[::-1] if transposed else want
    if params_hf[name].shape != want:
      raise ValueError(f"{source}: {name} has shape {params_hf[name].shape}, the config implies "
                       f"{want}")
  nnx.replace_by_pure_dict(state, jax.tree.map(
    lambda w, s: jnp.asarray(w, s.dtype), params, expected))
  nnx.update(model, state)
  return cfg, model
