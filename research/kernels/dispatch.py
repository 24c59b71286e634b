"""The one place that picks a kernel implementation from the config and the backend
(docs/kernels.md).

Grouped matmul (`model.moe.gmm`): "xla" jax.lax.ragged_dot, "pallas" the Pallas kernel of
research/kernels/grouped_matmul.py (interpret mode exactly when the backend is CPU), "reference"
its pure-jnp loop over groups. All three have ragged_dot's semantics and signature
(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N].
"""

import functools
from collections.abc import Callable

import jax

from research.kernels import grouped_matmul as gmm_lib

Array = jax.Array
GroupedMatmul = Callable[[Array, Array, Array], Array]

GMM_IMPLS = ("xla", "pallas", "reference")


def interpret(backend: str | None = None) -> bool:
  """Whether Pallas kernels run in interpret mode: exactly on CPU (`backend` defaults to JAX's
  default backend, the platform the jitted model lowers for)."""
  return (backend or jax.default_backend()) == "cpu"


def grouped_matmul_fn(impl: str, backend: str | None = None) -> GroupedMatmul:
  """The grouped matmul `impl` (one of GMM_IMPLS) for `backend` (default: JAX's default)."""
  if impl == "xla":
    return jax.lax.ragged_dot
  if impl == "pallas":
    return functools.partial(gmm_lib.grouped_matmul, interpret=interpret(backend))
  if impl == "reference":
    return gmm_lib.grouped_matmul_reference
  raise ValueError(f"unknown grouped matmul implementation {impl!r} (config.model.moe.gmm); "
                   f"expected one of {GMM_IMPLS}")
