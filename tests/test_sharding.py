"""Sharded training on 8 simulated CPU devices: mesh sizes, placement by the logical rules, and
per-step losses equal to the 1-device run.

The device count is fixed when JAX starts, so the training runs happen in subprocesses: this file
doubles as their worker (`python tests/test_sharding.py '<json job>'`), which trains on each mesh of
the job in turn.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections as mlc
import numpy as np
import pytest

from research.config import ConfigError
from research.train import mesh as mesh_lib
from tests import launch_util

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.d_ff": 64, "data.seq_len": 32, "train.batch_size": 8, "data.bpe_vocab_size": 512,
    "data.shuffle_window": 64,
    "train.eval_batches": 2, "wandb.mode": "disabled", "train.progress": False,
    "train.log_every": 1,
}
STEPS = 4
MESHES = {"data8": (8, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2), "fsdp4_tensor2": (1, 4, 2)}
# float32 on CPU; sharded reductions sum in another order. Observed over 4 steps on every mesh:
# losses within 4.8e-7 of the 1-device run (a few ulps, rel 8e-8), validation NLL within 2.4e-7.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)


def python(args: list[str], *, devices: int, timeout: float) -> subprocess.CompletedProcess:
  """Runs `python args` from the repo root on `devices` simulated CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=launch_util.xla_flags(devices))
  return launch_util.python_run(args, env=env, timeout=timeout)


def run_worker(job: dict, *, devices: int) -> dict:
  proc = python([__file__, json.dumps(job)], devices=devices, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- mesh_shape (no devices needed) --------------------------------------------------------------


def mesh_cfg(data: int, fsdp: int, tensor: int) -> mlc.ConfigDict:
  return mlc.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("sizes, devices, expected", [
    ((-1, 1, 1), 1, (1, 1, 1, 1)),  # (data, fsdp, expert, tensor); config.mesh.expert absent: 1
    ((-1, 1, 1), 8, (8, 1, 1, 1)),
    ((-1, 2, 2), 8, (2, 2, 1, 2)),
    ((2, -1, 2), 8, (2, 2, 1, 2)),
    ((1, 4, -1), 8, (1, 4, 1, 2)),
    ((2, 2, 2), 8, (2, 2, 1, 2)),
])
def test_mesh_shape_fills_the_free_axis(sizes, devices, expected):
  assert mesh_lib.mesh_shape(mesh_cfg(*sizes), devices) == expected


@pytest.mark.parametrize("sizes, devices, match", [
    ((-1, -1, 1), 8, r"at most one axis may be -1, got data, fsdp"),
    ((0, 1, 1), 8, r"config\.mesh\.data=0: must be a positive size or -1"),
    ((1, -2, 1), 8, r"config\.mesh\.fsdp=-2"),
    ((-1, 3, 1), 8, r"config\.mesh \(data=-1 x fsdp=3 x expert=1 x tensor=1\): the fixed axes "
                    r"multiply to 3"),
    ((3, 1, 1), 8, r"config\.mesh \(data=3 x fsdp=1 x expert=1 x tensor=1\): 3 devices, but 8 are "
                      r"available"),
    ((2, 2, 2), 4, r"8 devices, but 4 are available"),
])
def test_mesh_shape_errors_name_the_key(sizes, devices, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.mesh_shape(mesh_cfg(*sizes), devices)


# --- training on 8 simulated devices ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """Losses and state placement of the 1-device run and of each 8-device mesh."""
  tmp = tmp_path_factory.mktemp("sharding")
  overrides = dict(TINY, **{"data.cache_dir": str(tmp / "cache")})
  # The 1-device run goes first: it trains the BPE tokenizer the other runs reuse.
  one = run_worker({"overrides": overrides, "workdir": str(tmp), "meshes": {"one": (-1, 1, 1)}},
                   devices=1)
  eight = run_worker({"overrides": overrides, "workdir": str(tmp), "meshes": MESHES}, devices=8)
  return {**one, **eight}


@pytest.mark.parametrize("name", MESHES)
def test_sharded_losses_match_one_device(runs, name):
  data, fsdp, tensor = MESHES[name]
  assert runs[name]["mesh"] == dict(data=data, fsdp=fsdp, expert=1, tensor=tensor)
  np.testing.assert_allclose(runs[name]["losses"], runs["one"]["losses"], **LOSS_TOL)
  np.testing.assert_allclose(runs[name]["valid_nll"], runs["one"]["valid_nll"], **LOSS_TOL)


@pytest.mark.parametrize("name", MESHES)
def test_state_is_sharded_by_the_logical_rules(runs, name):
  data, fsdp, tensor = MESHES[name]
  d, v, h, k, f = 32, 512, 32, 16, 64  # d_model, vocab, heads * head_dim, kv width, d_ff
  block, adam = "['core']['blocks']", "['opt'][1][0]"
  expected = {  # state path: (spec, global shape, shape of one device's shard)
      "['params']['embed']['embedding']": (["tensor", "fsdp"], [v, d], [v // tensor, d // fsdp]),
      f"['params']{block}[0]['attn']['q_proj']['kernel']": (["fsdp", "tensor"], [d, h],
                                                            [d // fsdp, h // tensor]),
      f"['params']{block}[1]['attn']['k_proj']['kernel']": (["fsdp", "tensor"], [d, k],
                                                            [d // fsdp, k // tensor]),
      f"['params']{block}[0]['attn']['o_proj']['kernel']": (["tensor", "fsdp"], [h, d],
                                                            [h // tensor, d // fsdp]),
      f"['params']{block}[1]['ffn']['down_proj']['kernel']": (["tensor", "fsdp"], [f, d],
                                                              [f // tensor, d // fsdp]),
      f"['params']{block}[0]['attn_norm']['scale']": ([None], [d], [d]),
      f"{adam}.mu{block}[0]['ffn']['gate_proj']['kernel']": (["fsdp", "tensor"], [d, f],
                                                             [d // fsdp, f // tensor]),
      f"{adam}.nu['embed']['embedding']": (["tensor", "fsdp"], [v, d], [v // tensor, d // fsdp]),
  }
  placement = runs[name]["placement"]
  for path, (spec, shape, shard) in expected.items():
    got = placement[path + ".value"]
    assert (got["spec"], got["shape"], got["shard"]) == (spec, shape, shard), path
    assert got["devices"] == data * fsdp * tensor, path
  assert runs[name]["batch_spec"] == [["data", "fsdp", "expert"], None]


def test_invalid_mesh_fails_before_compiling(tmp_path):
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
  proc = python(["launch.py", "--config=configs/vanilla.py:tiny", f"--workdir={tmp_path / 'run'}",
                 "--config.mesh.data=3", *overrides], devices=8, timeout=120)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.mesh (data=3 x fsdp=1 x expert=1 x tensor=1): 3 devices, "
                         "but 8 are available"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()  # failed in setup, before the corpus or any step


# --- worker --------------------------------------------------------------------------------------


def train_on_mesh(overrides: dict, mesh: tuple[int, int, int], workdir: str) -> dict:
  """Trains STEPS steps through the loop's own building blocks; reports losses and placement."""
  import jax

  from configs import vanilla
  from research.train import checkpoint, loop

  cfg = vanilla.get_config("tiny")
  cfg.update_from_flattened_dict(overrides)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  run = loop.setup(cfg, workdir)
  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  state, _, it = loop.restore_or_init(run, mngr)
  mngr.close()
  train_step, eval_step = loop.compile_steps(run)
  losses = []
  for _ in range(STEPS):
    batch = mesh_lib.host_to_global(next(it), run.mesh)
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))

  def spec(x: jax.Array) -> list:
    """The PartitionSpec padded with None to the array's rank (tuples become JSON lists)."""
    names = list(x.sharding.spec)
    return names + [None] * (x.ndim - len(names))

  placement = {
      jax.tree_util.keystr(path): {
          "spec": spec(x),
          "shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape),
          "devices": len(x.sharding.device_set)}
      for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  return {"losses": losses, "valid_nll": loop.evaluate(run, eval_step, state)["nll"],
          "mesh": dict(run.mesh.shape), "placement": placement,
          "batch_spec": spec(batch["tokens"])}


if __name__ == "__main__":
  job = json.loads(sys.argv[1])
  print(json.dumps({name: train_on_mesh(job["overrides"], mesh, os.path.join(job["workdir"], name))
                    for name, mesh in job["meshes"].items()}))
