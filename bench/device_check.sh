#!/usr/bin/env bash
# One prepared accelerator check (docs/kernels.md), about 9 minutes on one GPU:
#   1. the kernel bench (bench/kernels.py: grouped matmul and routed attention vs XLA, JSON + table),
#   2. our side of bench/vs_torch.py (no torch): the bfloat16 train step time and MFU of the
#      vanilla and recursive models at the torch comparison's shapes,
#   3. a 50-step bfloat16 training run of configs/vanilla.py:small, printing its MFU,
#   4. the inference bench in --quick mode, if bench/inference_throughput.py exists.
# Each part has its own time limit and a failing part does not stop the others; the summary at
# the end gives every part's exit status. Outputs go to $OUT (the device tool's folder) or to
# $CHECK_DIR, else a fresh temporary directory.
#
#   bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
DIR="${OUT:-${CHECK_DIR:-$(mktemp -d)}}"
mkdir -p "$DIR"
echo "device_check: outputs in $DIR"
python -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"

declare -A RC
run_part() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
  RC[$name]=${PIPESTATUS[0]}
  echo "=== $name: exit ${RC[$name]} after $((SECONDS - t0)) s"
}

run_part kernels 210 python -m bench.kernels --json="$DIR/kernels.json" --steps=5

run_part vs_torch_ours 80 python -m bench.vs_torch --ours_only --dtype=bfloat16 --rounds=10 \
  --json="$DIR/vs_torch_ours.json"

TRAIN_DIR="$DIR/train_small_bf16"
run_part train 170 python launch.py --config=configs/vanilla.py:small --workdir="$TRAIN_DIR" \
  --config.train.steps=50 --config.model.compute_dtype=bfloat16 --config.train.log_every=10 \
  --config.train.eval_every=0 --config.checkpoint.every=0 --config.wandb.mode=disabled \
  --config.train.progress=False
if [ -f "$TRAIN_DIR/metrics.jsonl" ]; then
  python - "$TRAIN_DIR/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r.get("kind") == "train" and "mfu" in r]
for r in train:  # the first record includes compilation
  print(f"step {r['step']:>3}  loss {r['loss']:.3f}  tokens/s {r['tokens_per_s']:.0f}  "
        f"step {1e3 * r['step_time_s']:.1f} ms  MFU {100 * r['mfu']:.1f} %")
if len(train) > 1:
  print(f"MFU after compilation (steps {train[1]['step']}-{train[-1]['step']}): "
        f"{100 * sum(r['mfu'] for r in train[1:]) / len(train[1:]):.1f} %")
PY
fi

if [ -f bench/inference_throughput.py ]; then
  run_part inference 60 python -m bench.inference_throughput --quick
else
  echo "=== inference: bench/inference_throughput.py does not exist; skipped"
fi

echo "=== summary"
for name in "${!RC[@]}"; do echo "$name: exit ${RC[$name]}"; done
