"""The benchmark scripts still run: each with --smoke (a tiny random model, seconds)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_quickstart_figures_smoke(tmp_path):
    """The README's figures script: the Markdown it prints is the run's own metrics.json, time and peak RSS."""
    from intentlora.report import display_name, verdict

    work = tmp_path / "work"
    command = [sys.executable, str(ROOT / "benchmarks" / "quickstart_figures.py"), "--smoke", "--quiet", "--output", str(work),
               "--set", "data.prompt_template=null"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [metrics_file] = (work / "runs").glob("*/metrics.json")
    assert "prompt_template: null" in (metrics_file.parent / "config.yaml").read_text()  # --set reached the run
    metrics = json.loads(metrics_file.read_text())
    figures = json.loads((work / "figures.json").read_text())["quickstart"]
    assert figures["wall_s"] > 0 and 0 < figures["peak_rss_mb"] < 64 * 1024
    assert f"peaked at **{figures['peak_rss_mb'] / 1024:.1f} GB** of RAM" in result.stdout
    for name, m in [*metrics["baselines"].items(), ("lora", metrics["lora"])]:
        assert f"| {display_name(name)} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} |" in result.stdout
    assert all(sentence in result.stdout for sentence in verdict(metrics))  # the README's claim is the report's


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
    assert "end to end: OK" in result.stdout and (tmp_path / "export" / "config.json").is_file()


def test_bench_quality_smoke(tmp_path):
    """The quality suite's plumbing: subsets, one training process per seed, TF-IDF, mean +- std, the table."""
    import pytest

    out = tmp_path / "quality.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--smoke", "--datasets", "bank_zh",
               "--seeds", "1,2", "--json", str(out), "--keep", str(tmp_path / "keep"), "--set", "train.min_steps=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "train.min_steps=3" in report["set"] and "--smoke" in report["command"]
    [row] = report["rows"]
    assert row["dataset"] == "bank_zh" and row["seeds"] == [1, 2] and row["labels"] == 3
    assert [run["steps"] for run in row["runs"]] == [3, 3]
    for stat in ("lora_macro_f1", "lora_accuracy", "samples_per_s"):
        values = [run[stat.removeprefix("lora_")] for run in row["runs"]]
        assert row[stat]["mean"] == pytest.approx(sum(values) / 2)
    assert 0 <= row["tfidf_macro_f1"] <= 1
    assert row["lora_minus_tfidf_macro_f1"] == pytest.approx(row["lora_macro_f1"]["mean"] - row["tfidf_macro_f1"])
    assert "| bank_zh | " in result.stdout and "LoRA − TF-IDF" in result.stdout
    paired = [run["macro_f1"] - run["tfidf_same_split_macro_f1"] for run in row["runs"]]
    assert row["lora_minus_tfidf_same_split"]["mean"] == pytest.approx(sum(paired) / 2)

    # --keep: the same command reuses the finished runs; another --set value trains again
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing ") == 2 and "$ " not in again.stdout
    assert json.loads(out.read_text())["rows"][0]["runs"] == row["runs"]
    other = subprocess.run([*command[:-1], "train.min_steps=4"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 0 and "reusing " not in other.stdout
    assert [run["steps"] for run in json.loads(out.read_text())["rows"][0]["runs"]] == [4, 4]
    # a kept run whose other settings differ from today's defaults (a default changed since) trains again
    config = tmp_path / "keep" / "runs" / "bank_zh-seed1" / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace("select_best: true", "select_best: false") if "select_best: true" in text
                      else text.replace("select_best: false", "select_best: true"))
    third = subprocess.run([*command[:-1], "train.min_steps=4"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and third.stdout.count("reusing ") == 1 and third.stdout.count("$ ") == 1
