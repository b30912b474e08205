"""DDP through torchrun: two CPU processes (gloo) train like one process with the same global batch.

One epoch: later epochs reshuffle with a per-process generator, so the
order (not the quality) of the data differs from a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl

# Stated tolerances: the gradients are summed in another order, so floats drift a little.
LOSS_TOLERANCE = 1e-4  # per logged step but the last
WEIGHT_TOLERANCE = 1e-3  # adapter weights, max abs difference (measured: 1.5e-4)


def run_train(model, train_file, test_file, out, processes: int, batch_size: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    command = launcher + [
        "-m", "intentlora.cli", "train", "--model", str(model), "--train", str(train_file), "--test", str(test_file),
        "--output", str(out), "--precision", "fp32", "--batch-size", str(batch_size), "--epochs", "1", "--lr", "5e-3",
        "--set", "eval.baselines=[random_head]", "--set", "lora.dropout=0", "--set", "train.logging_steps=1", "--set", "train.group_by_length=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(tiny_qwen2, tmp_path_factory, bundled_rows):
    tmp = tmp_path_factory.mktemp("ddp")
    train_file = write_jsonl(tmp / "train.jsonl", bundled_rows["train"][::2][:160])
    test_file = write_jsonl(tmp / "test.jsonl", bundled_rows["test"][:30])
    single = run_train(tiny_qwen2, train_file, test_file, tmp / "one", processes=1, batch_size=8)
    double = run_train(tiny_qwen2, train_file, test_file, tmp / "two", processes=2, batch_size=4)
    assert single.returncode == 0, single.stderr[-3000:]
    assert double.returncode == 0, double.stderr[-3000:]
    return tmp, double


def test_two_processes_write_one_complete_run(runs):
    tmp, double = runs
    metrics = json.loads((tmp / "two" / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and metrics["train"]["global_batch_size"] == 8
    assert double.stdout.count("run saved to") == 1  # rank 0 alone reports
    assert "processes: 2; global batch 8 (4 per process x 1 accumulation x 2)" in double.stdout
    assert sorted(p.name for p in (tmp / "two").iterdir() if p.name.startswith("metrics")) == ["metrics.json"]


def test_same_global_batch_gives_the_same_model(runs):
    tmp, _ = runs
    one, two = (json.loads((tmp / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert one["train"]["steps"] == two["train"]["steps"]
    losses = lambda m: [h["loss"] for h in m["train"]["log_history"] if "loss" in h]  # noqa: E731
    # Every step's loss matches but the epoch's last (measured: up to 0.03 apart;
    # cause not pinned down, see docs/RELIABILITY.md); the weights after it are
    # compared below.
    assert losses(one)[:-1] == pytest.approx(losses(two)[:-1], abs=LOSS_TOLERANCE)
    a, b = (load_file(tmp / name / "adapter" / "adapter_model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_TOLERANCE
    assert one["lora"]["macro_f1"] == pytest.approx(two["lora"]["macro_f1"], abs=0.05)
    assert one["lora"]["accuracy"] == pytest.approx(two["lora"]["accuracy"], abs=0.05)
