"""The benchmark scripts still run: each with --smoke (a tiny random model, seconds)."""

import importlib.util
import json
import os
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


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--smoke", "--quiet", "--json", str(out),
               "--labels", "balance,refund,card_lost"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert set(rows) == {"reference", "intentlora"}
    for row in rows.values():
        assert row["samples_per_s"] > 0 and 0 < row["real_tokens_per_s"] <= row["padded_tokens_per_s"]
        assert row["labels"] == 3 and row["n_test"] == rows["reference"]["n_test"] <= 16
    assert f"intentlora / reference: samples_per_s {rows['intentlora']['samples_per_s'] / rows['reference']['samples_per_s']:.2f}x" in result.stdout


def test_gpu_check_script_smoke(tmp_path):
    """The GPU check's plumbing on CPU: a tiny model, the environment as it is."""
    from intentlora.config import BUNDLED_DATA

    env = {**os.environ, "SMOKE": "1", "INSTALL": "0", "PYTHON": sys.executable, "DATA": str(BUNDLED_DATA), "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in ("reference", "intentlora"):
        assert f"{name}: training {rows[name]['wall_s']:.0f} s" in result.stdout
        assert rows[name]["process_s"] > rows[name]["wall_s"]
    assert "the reference tutorial reports 183 s" in result.stdout
