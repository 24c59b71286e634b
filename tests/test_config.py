"""Configs: every file and preset validates and builds; bad input is refused by key, early."""

import glob
import importlib
import os
import re
import time

import pytest
from flax import nnx

from research import config as config_lib
from research.model.lm import LanguageModel
from tests import launch_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if not p.endswith(("__init__.py", "base.py", "presets.py"))
    and "def get_config(" in open(p).read())  # helper modules (ablations/moe_common.py) define none


@pytest.mark.parametrize("module", CONFIG_FILES)
@pytest.mark.parametrize("preset", ["tiny", "small", "135m", "360m"])
def test_every_config_validates_and_builds_abstractly(module, preset):
  cfg = importlib.import_module(module).get_config(preset)
  config_lib.validate(cfg)
  cfg = config_lib.with_derived(cfg, cfg.data.bpe_vocab_size)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0)))
  assert model.embed.embedding.shape == (cfg.model.vocab_size, cfg.model.d_model)


def test_paper_shapes_of_the_smollm_presets():
  from configs import vanilla
  m = vanilla.get_config("360m").model
  assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff) == (960, 32, 15, 5, 2560)
  m = vanilla.get_config("135m").model
  assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff) == (576, 30, 9, 3, 1536)


@pytest.mark.parametrize("key,value,needle", [
    ("model.num_heads", 7, "config.model.num_heads=7: must divide config.model.d_model=128"),
    ("model.num_kv_heads", 3, "config.model.num_kv_heads=3"),
    ("model.compute_dtype", "fp8", "config.model.compute_dtype='fp8'"),
    ("train.grad_accum", 3, "config.train.grad_accum=3: must divide config.train.batch_size=16"),
    ("train.schedule", "linear", "config.train.schedule='linear'"),
    ("train.decay_fraction", 0.99, "config.train.decay_fraction=0.99"),
    ("data.source", "jsonl", "config.data.train_files=''"),
    ("data.tokenizer", "/nonexistent/tok.json", "config.data.tokenizer='/nonexistent/tok.json'"),
    ("wandb.mode", "loud", "config.wandb.mode='loud'"),
])
def test_invalid_values_name_the_key(key, value, needle):
  from configs import vanilla
  cfg = vanilla.get_config("tiny")
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=None) as e:
    config_lib.validate(cfg)
  assert needle in str(e.value)


def test_unknown_preset_is_refused():
  from configs import vanilla
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    vanilla.get_config("huge")


def run_launch(*args):
  t0 = time.time()
  proc = launch_util.python_run(["launch.py", *args], env=dict(os.environ), timeout=120, cwd=ROOT)
  return proc, time.time() - t0


def test_launcher_refuses_bad_heads_before_compiling(tmp_path):
  proc, seconds = run_launch("--config=configs/vanilla.py:tiny", f"--workdir={tmp_path}",
                             "--config.model.num_heads=7")
  assert proc.returncode != 0
  assert "config.model.num_heads=7: must divide config.model.d_model=128" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing was written: it stopped before data or compile
  assert seconds < 60


def test_launcher_refuses_mistyped_key(tmp_path):
  proc, _ = run_launch("--config=configs/vanilla.py:tiny", f"--workdir={tmp_path}",
                       "--config.model.num_head=4")
  assert proc.returncode != 0
  assert "num_head" in proc.stderr and "num_heads" in proc.stderr  # "Did you mean"


def test_a_flop_budget_gives_the_whole_steps_that_fit():
  """Issue 15 item 17: the docs say the step count floors; 1.81e13 FLOPs at 15.1e9 per step
  (tiny shape, 15 layers, 8 x 256 tokens) is 1198.7 steps: 1198, not the rounded 1199."""
  from configs import vanilla
  from research.train import loop
  c = vanilla.get_config("tiny")
  c.model.num_layers, c.data.seq_len, c.train.batch_size = 15, 256, 8
  c.train.flop_budget = 1.81e13
  assert loop.flops_per_step(c) == 15099494400.0
  assert loop.total_steps(c) == 1198


def test_help_exits_0_and_print_config_lists_every_knob():
  proc, _ = run_launch("--help")
  assert proc.returncode == 0, proc.stderr
  assert "--print_config" in proc.stdout and "--config.mode=eval" in proc.stdout
  proc, _ = run_launch("--config=configs/mor.py:tiny", "--config.train.lr=0.01", "--print_config")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  from configs import mor
  from research import config_doc
  assert len(lines) == len(config_doc.flatten(mor.get_config("tiny")))
  assert re.search(r"^train\.lr = 0\.01 +# peak learning rate$", proc.stdout, re.M)
  assert re.search(r"^model\.mor\.kind = 'expert' +# none \| expert", proc.stdout, re.M)
  uncommented = {k for k, c in config_doc.base_comments().items() if not c}
  assert {line.split(" = ")[0] for line in lines if "  # " not in line} == uncommented


@pytest.mark.parametrize("args,needle", [
    (("--config=configs/mor.py:huge",), "error: --config=configs/mor.py:huge: unknown preset "
     "'huge'; choose one of tiny, small, 135m, 360m"),
    (("--config=configs/nope.py",), "error: --config=configs/nope.py: no such file"),
    (("--config=configs/vanilla.py:tiny", "--config.train.lr=fast"),
     "error: config.train.lr='fast': not a valid float value"),
])
def test_launcher_errors_before_any_work_are_one_line(tmp_path, args, needle):
  proc, _ = run_launch(*args, f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]], proc.stderr
  assert proc.stderr.strip().startswith(needle), proc.stderr
  assert not (tmp_path / "w").exists()
