"""The one place that picks a kernel implementation from the config and the backend
(docs/kernels.md).

Grouped matmul (`model.moe.gmm`): "xla" jax.lax.ragged_dot, "pallas" the Pallas kernel of
research/kernels/grouped_matmul.py (interpret mode exactly when the backend is CPU), "tiled" its
tiling in plain XLA (research/kernels/tiled_grouped_matmul.py), "reference" the pure-jnp loop
over groups, "auto" tiled on CPU (where ragged_dot runs every row through every group) and xla
elsewhere. All have ragged_dot's semantics and signature
(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N].

Attention (`model.attention_impl`): "xla" research/kernels/xla_attention.py (masked einsums,
causal block skipping for sorted self-attention and sorted queries over a row's keys; on CPU
through its flash-style custom VJP), "pallas" research/kernels/routed_attention.py (interpret
mode exactly when the backend is CPU), "reference" its plain masked softmax, "auto" pallas on
GPU/TPU and xla on CPU. All have the signature of `Attention` below.
"""

import functools
from collections.abc import Callable
from typing import Protocol

import jax

from research.kernels import grouped_matmul as gmm_lib
from research.kernels import routed_attention as attn_lib
from research.kernels import tiled_grouped_matmul as tiled_gmm
from research.kernels import xla_attention

Array = jax.Array
GroupedMatmul = Callable[[Array, Array, Array], Array]

GMM_IMPLS = ("auto", "xla", "pallas", "tiled", "reference")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "reference")


class Attention(Protocol):
  """out_BTHD = attend(q_BTHD, k_BSKD, v_BSKD, q_idx_BT, q_seg_BT, kv_idx_BS, kv_seg_BS, *,
  causal, cross_segments, sorted_self_attention=False, sorted_queries_row_keys=False); semantics
  of research/kernels/routed_attention.py. Two promises, which only the xla implementation uses
  (causal block skipping; the others skip blocks from the data):
  `sorted_self_attention=True`: kv are the queries' own tokens with ascending indices;
  `sorted_queries_row_keys=True`: kv are the row's S tokens in index order (kv_idx[b, j] = j)
    and every query slot, padding included, has a distinct index, ascending along the row (MoR
    KV sharing), so query i's index is at most S - T + i."""

  def __call__(self, q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_idx_BT: Array,
               q_seg_BT: Array, kv_idx_BS: Array, kv_seg_BS: Array, *, causal: bool,
               cross_segments: bool, sorted_self_attention: bool = False,
               sorted_queries_row_keys: bool = False) -> Array: ...


def interpret(backend: str | None = None) -> bool:
  """Whether Pallas kernels run in interpret mode: exactly on CPU (`backend` defaults to JAX's
  default backend, the platform the jitted model lowers for)."""
  return (backend or jax.default_backend()) == "cpu"


def grouped_matmul_fn(impl: str, backend: str | None = None) -> GroupedMatmul:
  """The grouped matmul `impl` (one of GMM_IMPLS) for `backend` (default: JAX's default)."""
  if impl == "auto":
    impl = "tiled" if interpret(backend) else "xla"
  if impl == "tiled":
    return tiled_gmm.tiled_grouped_matmul
  if impl == "xla":
    return jax.lax.ragged_dot
  if impl == "pallas":
    return functools.partial(gmm_lib.grouped_matmul, interpret=interpret(backend))
  if impl == "reference":
    return gmm_lib.grouped_matmul_reference
  raise ValueError(f"unknown grouped matmul implementation {impl!r} (config.model.moe.gmm); "
                   f"expected one of {GMM_IMPLS}")


def attention_impl(impl: str, backend: str | None = None) -> str:
  """The concrete implementation `impl` names on `backend`: auto -> pallas on GPU/TPU, xla on
  CPU; the others name themselves."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r} (config.model.attention_impl); "
                     f"expected one of {ATTENTION_IMPLS}")
  if impl == "auto":
    return "xla" if interpret(backend) else "pallas"
  return impl


def _pallas_attention(*args, causal: bool, cross_segments: bool,
                      sorted_self_attention: bool = False, sorted_queries_row_keys: bool = False,
                      interpret: bool) -> Array:
  del sorted_self_attention, sorted_queries_row_keys  # the kernel skips blocks from the data
  return attn_lib.routed_attention(*args, causal=causal, cross_segments=cross_segments,
                                   interpret=interpret)


def _reference_attention(*args, causal: bool, cross_segments: bool,
                         sorted_self_attention: bool = False,
                         sorted_queries_row_keys: bool = False) -> Array:
  del sorted_self_attention, sorted_queries_row_keys
  return attn_lib.routed_attention_reference(*args, causal=causal, cross_segments=cross_segments)


def attention_fn(impl: str, backend: str | None = None) -> Attention:
  """The attention `impl` (one of ATTENTION_IMPLS) for `backend` (default: JAX's default)."""
  impl = attention_impl(impl, backend)
  if impl == "xla":
    return xla_attention.xla_attention
  if impl == "pallas":
    return functools.partial(_pallas_attention, interpret=interpret(backend))
  return _reference_attention
