"""The benchmark scripts still run: bench_infer.py --smoke (a tiny random model, seconds)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_infer_smoke(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--smoke", "--json", str(out)]
    if importlib.util.find_spec("locust") is None:  # the `bench` extra: without it, only the throughput part
        command.append("--skip-load")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [(r["name"], r["batch_size"]) for r in figures["throughput"]] == [
        ("transformers.pipeline", 1), ("transformers.pipeline", 32), ("IntentClassifier.predict", 32)]
    assert all(r["texts_per_s"] > 0 for r in figures["throughput"])
    for level in figures.get("load", []):
        assert level["requests"] > 0 and level["errors"] == 0
