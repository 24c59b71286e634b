"""Peak FLOP/s of the device, for MFU.

Accelerators: dense bf16 peaks from the vendors' data sheets. CPU: measured once by a float32
matmul probe and cached in ~/.cache/research/peak_flops.json, keyed by CPU model and core count.
"""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 FLOP/s per device, from NVIDIA / Google data sheets.
DEVICE_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12,
    "A10": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
CACHE = os.path.expanduser("~/.cache/research/peak_flops.json")


def _cpu_key() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
      model = names[0] if names else model
  except OSError:
    pass
  return f"{model} x{os.cpu_count()}"


def measure_matmul_flops(n: int = 1024, repeats: int = 20) -> float:
  """Best-of float32 n x n matmul throughput on the default device, FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def peak_flops_per_device() -> tuple[float, str]:
  """(FLOP/s, where the figure came from) for jax.devices()[0]."""
  kind = jax.devices()[0].device_kind
  for name, flops in DEVICE_PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"data sheet ({kind})"
  if jax.default_backend() != "cpu":
    return float("nan"), f"unknown device kind {kind!r}: add it to DEVICE_PEAK_FLOPS"
  key = _cpu_key()
  try:
    with open(CACHE) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if key not in cached:
    cached[key] = measure_matmul_flops()
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    tmp = f"{CACHE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(cached, f, indent=1)
    os.replace(tmp, CACHE)
  return cached[key], f"measured f32 matmul probe ({key})"
