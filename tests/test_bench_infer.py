"""benchmarks/bench_infer.py still runs end to end (--smoke: a tiny random model, offline and served)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_infer_smoke_measures_offline_and_served_throughput(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx backends need the `onnx` extra")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["查余额", "我的卡丢了", "refund"]), encoding="utf-8")
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--smoke", "--backends", "torch-fp32,onnx-fp32",
               "--agreement", str(texts), "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures["backends"]) == ["torch-fp32", "onnx-fp32"]
    for row in figures["backends"].values():
        assert row["texts_per_s"] > 0
        [level] = row["server"]
        assert level["clients"] == 2 and level["requests"] > 0 and level["errors"] == 0
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        assert level["ratio_to_offline"] == pytest.approx(level["requests_per_s"] / row["texts_per_s"])
    assert figures["backends"]["onnx-fp32"]["top1_agreement"] == {str(texts): 1.0}  # ONNX fp32 computes what torch fp32 does
    assert "server, 2 clients:" in result.stdout and "x offline; p50" in result.stdout
