"""Expert parallelism on 8 simulated CPU devices (research/model/expert_parallel.py): for MoE, CoE,
RMoE and ReXMoE, the LM's loss and the gradients of every parameter on the meshes (data 2,
expert 4) and (expert 8) equal the one-device run, dropless and with capacity dropping; the
expert weights (a ReXMoE pool too) are sharded over `expert` and the step runs all-to-alls;
launch.py trains with --config.mesh.expert=4 --config.mesh.data=2; bad expert meshes fail with
one `error:` line naming config.mesh.expert.

The device count is fixed when JAX starts: the 8-device runs happen in one subprocess, this file
being its worker (`python tests/test_expert_parallel.py '<json job>'`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import config as config_lib
from research.model import expert_parallel
from tests import launch_util
from tests.model_util import tiny_config

REPO = Path(__file__).resolve().parents[1]
MOE = dict(num_experts=8, top_k=2, d_ff=16)
CASES = {  # name: model.moe keys (tiny_config: d 32, 2 layers, both MoE)
    "moe": MOE,
    "moe_capacity": dict(MOE, capacity_factor=0.5),  # drops (asserted below)
    "coe": dict(MOE, iterations=2, top_k=1, num_shared_experts=1, coe_residual="inner"),
    "rmoe": dict(MOE, router="gru", gru_dim=8),
    "rexmoe": dict(MOE, num_experts=4, rex_group=2),  # a pool of 8 over 2 layers, no PSR
}
MESHES = {"data2_expert4": (2, 1, 4, 1), "expert8": (1, 1, 8, 1),  # (data, fsdp, expert, tensor)
          "fsdp2_expert4": (1, 2, 4, 1)}  # the experts' d_model sharded over fsdp too
# Every mesh for plain MoE; the other cases on the mesh that mixes data and expert (compile time).
PAIRS = [(c, m) for c in CASES for m in MESHES if c == "moe" or m == "data2_expert4"]
# float32; the sharded weight gradients sum the tokens in another order. Observed: losses within
# 9.6e-7 (rel 2.4e-7) and gradients within 3.8e-8 of the one-device run.
TOL = 1e-5


def python(args: list[str], *, devices: int, timeout: float) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=launch_util.xla_flags(devices))
  return launch_util.python_run(args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs() -> dict:
  job = {"cases": CASES, "meshes": MESHES, "pairs": PAIRS}
  proc = python([__file__, json.dumps(job)], devices=8, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,mesh", PAIRS)
def test_loss_and_gradients_equal_one_device(runs, case, mesh):
  got = runs[case][mesh]
  assert got["all_to_all"] >= 3, "the step should dispatch, return and differentiate all-to-alls"
  np.testing.assert_allclose(got["loss"], runs[case]["one"]["loss"], rtol=TOL, atol=TOL)
  assert got["grad_max_diff"] < TOL, got["grad_worst"]
  assert got["grad_max_abs"] > 1e-4  # the gradients compared are not all zero
  n = MESHES[mesh][2]
  for path, (shape, shard) in got["expert_weights"].items():
    fsdp = MESHES[mesh][1]  # d_model is the middle axis of gate/up [E, D, F], the last of down
    want = [shape[0] // n, *shape[1:]]
    want[1 if "down_proj" not in path else 2] //= fsdp
    assert shard == want, path  # the expert axis is split n ways (and d_model fsdp ways)
  if case == "rexmoe":
    assert any("pool" in p for p in got["expert_weights"])
  if case == "moe_capacity":
    assert 0 < runs[case]["one"]["dropped"] < 1


@pytest.mark.parametrize("case", ["skewed", "skewed_capacity"])
def test_every_token_on_one_device(runs, case):
  """The worst case of the padded buffers: every assignment goes to device 0's experts."""
  for mesh in MESHES:
    assert runs[case][mesh] < TOL, (case, mesh, runs[case][mesh])
  if case == "skewed_capacity":
    assert runs[case]["dropped"] > 0.5  # capacity 2 of 64 tokens per row-expert


def test_buffer_rows():
  assert expert_parallel.buffer_rows(16, 2, 2, 2, None) == 32  # dropless: every assignment
  assert expert_parallel.buffer_rows(16, 2, 2, 2, 3) == 12  # 2 rows x C=3 x 2 local experts
  assert expert_parallel.buffer_rows(4, 2, 1, 4, 3) == 8  # never more than the assignments


def moe_cfg(batch_size=8, **moe_keys):
  cfg = tiny_config(moe=dict(dict(MOE), **moe_keys))
  cfg.train.batch_size = batch_size
  return cfg


@pytest.mark.parametrize("moe_keys,mesh,needle", [
    (dict(num_experts=6), (2, 1, 4, 1), "config.mesh.expert=4: must divide "
     "config.model.moe.num_experts=6"),
    (dict(num_experts=3, rex_group=2), (2, 1, 4, 1), "config.mesh.expert=4: must divide the r E = "
     "6 experts of a ReXMoE group's pool"),
    (dict(num_experts=0), (2, 1, 4, 1), "config.mesh.expert=4: expert parallelism needs MoE"),
    (dict(impl="dense"), (2, 1, 4, 1), "config.model.moe.impl='dense' is not expert-parallel"),
    (dict(gmm="pallas"), (2, 1, 4, 1), "config.model.moe.gmm='pallas'"),
    ({}, (1, 1, 4, 2), "config.mesh.expert=4: with config.mesh.tensor=2: tensor parallelism"),
    (dict(batch_size=4), (2, 1, 4, 1), "must divide by the data*fsdp*expert mesh size 8"),
])
def test_bad_expert_meshes_are_refused_by_name(moe_keys, mesh, needle):
  if moe_keys.get("num_experts", 1):
    cfg = moe_cfg(**moe_keys)
  else:
    cfg = tiny_config()
    cfg.train.batch_size = 8
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_against_devices(cfg, mesh, 1)
  assert needle in str(e.value)


def test_expert_one_is_unchanged():
  config_lib.validate_against_devices(moe_cfg(impl="dense"), (4, 1, 1, 1), 1)


TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 32, "data.seq_len": 16, "train.batch_size": 8, "data.bpe_vocab_size": 512,
    "train.eval_batches": 1, "wandb.mode": "disabled", "train.progress": False,
    "train.log_every": 1, "train.steps": 2,
}


def test_launch_trains_with_an_expert_axis(tmp_path):
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  proc = python(["launch.py", "--config=configs/moe.py:tiny", f"--workdir={tmp_path / 'run'}",
                 "--config.mesh.expert=4", "--config.mesh.data=2", *flags], devices=8,
                timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    train = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["loss"]) and "moe/load" in r for r in train)
  # a bad expert axis fails in setup, before the corpus or any compilation, naming the key
  bad = python(["launch.py", "--config=configs/moe.py:tiny", f"--workdir={tmp_path / 'bad'}",
                "--config.mesh.expert=4", "--config.mesh.data=2",
                "--config.model.moe.num_experts=6", *flags], devices=8, timeout=120)
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.mesh.expert=4: must divide "
                         "config.model.moe.num_experts=6"), bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "bad").exists()


# --- worker --------------------------------------------------------------------------------------


def loss_and_grads(moe_keys: dict, mesh_shape: tuple | None) -> dict:
  """The LM loss (NLL + the aux losses) and its parameter gradients on one batch, on one device
  (mesh_shape None) or on the mesh; the batch's row 1 ends with 3 padding tokens."""
  import jax
  from flax import nnx

  from research.model.lm import LanguageModel
  from research.train import mesh as mesh_lib
  from research.train import step as step_lib
  from tests.model_util import random_batch

  cfg = tiny_config(moe=moe_keys)
  with nnx.use_eager_sharding(False):
    model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  batch = random_batch(8, 8)
  batch["segment_ids"] = batch["segment_ids"].at[1, -3:].set(0)

  def loss_fn(params, other, batch):
    nll, count, aux = step_lib.nll_sum(nnx.merge(graphdef, params, other), batch)
    return nll / count + sum(v for k, v in aux.items() if k.startswith("loss/")), aux

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  if mesh_shape is None:
    (loss, aux), grads = step(params, other, batch)
    out = {"loss": float(loss), "dropped": float(aux["moe/dropped"])}
    return out, grads
  mesh = jax.make_mesh(tuple(mesh_shape), mesh_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    params = jax.device_put(params, nnx.get_named_sharding(params, mesh))
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    compiled = step.lower(params, other, batch).compile()
    (loss, _), grads = compiled(params, other, batch)
    hlo = compiled.as_text()
  experts = {jax.tree_util.keystr(p): (list(x.shape), list(x.addressable_shards[0].data.shape))
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if any(n in jax.tree_util.keystr(p) for n in ("gate_proj", "up_proj", "down_proj"))
             and "ffn" in jax.tree_util.keystr(p) and x.ndim == 3}
  return {"loss": float(loss), "all_to_all": hlo.count("all-to-all("),
          "expert_weights": experts}, grads


def skewed_routing(capacity: int | None) -> dict:
  """expert_parallel.routed_experts against moe.ragged_experts (one device) when every token
  picks experts 0 and 1, all on the first device: its buffer is full (dropless: S = N k) or
  exactly at the capacity bound. Max differences of the loss and of the gradients w.r.t. x, the
  gates and the three weights, each relative to its largest entry (or absolute below 1), per
  mesh."""
  import jax
  import jax.numpy as jnp

  from research import routing
  from research.model import moe
  from research.train import mesh as mesh_lib

  b, t, d, f, e, k = 8, 8, 16, 8, 8, 2
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (b, t, d))
  ws = [0.3 * jax.random.normal(keys[i], s) for i, s in
        zip((1, 2, 3), ((e, d, f), (e, d, f), (e, f, d)), strict=True)]
  experts = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), (b, t, k))
  valid = jnp.ones((b, t), bool)
  keep = (jnp.ones((b, t, k), bool) if capacity is None
          else routing.within_capacity(experts, valid, e, capacity))
  gates = jnp.where(keep, jax.nn.softmax(jax.random.normal(keys[4], (b, t, k))), 0.0)
  probe = jnp.cos(jnp.arange(b * t * d, dtype=jnp.float32)).reshape(b, t, d)

  def loss(fn):
    return lambda x, g, *ws: jnp.sum(fn(x, g, *ws) * probe)

  one = lambda x, g, *ws: moe.ragged_experts(x, *ws, moe.Routing(None, g, experts, keep))
  ep = lambda x, g, *ws: expert_parallel.routed_experts(x, *ws, g, experts, keep,
                                                        capacity=capacity)
  args = (x, gates, *ws)
  ref = jax.jit(jax.value_and_grad(loss(one), argnums=range(5)))(*args)
  out = {"dropped": float(1 - jnp.mean(keep))}
  for name, shape in MESHES.items():
    mesh = jax.make_mesh(shape, mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
      got = jax.jit(jax.value_and_grad(loss(ep), argnums=range(5)))(*args)
    out[name] = max(float(jnp.max(jnp.abs(a - c)) / jnp.maximum(jnp.max(jnp.abs(a)), 1.0))
                    for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True))
  return out


def worker(job: dict) -> dict:
  import jax

  out = {"skewed": skewed_routing(None), "skewed_capacity": skewed_routing(2)}
  for case, keys in job["cases"].items():
    one, ref = loss_and_grads(keys, None)
    out[case] = {"one": one}
    for name, shape in job["meshes"].items():
      if [case, name] not in job["pairs"]:
        continue
      got, grads = loss_and_grads(keys, shape)
      diffs = jax.tree_util.tree_flatten_with_path(jax.tree.map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), ref, grads))[0]
      worst = max(diffs, key=lambda pd: pd[1])
      got.update(grad_max_diff=worst[1], grad_worst=jax.tree_util.keystr(worst[0]),
                 grad_max_abs=max(float(np.max(np.abs(np.asarray(g))))
                                  for g in jax.tree.leaves(ref)))
      out[case][name] = got
  return out


if __name__ == "__main__":
  print(json.dumps(worker(json.loads(sys.argv[1]))))
