"""DDP through torchrun: two CPU processes (gloo) train like one process with the same global batch,
and a two-process run killed after a checkpoint resumes into the run an uninterrupted one gives.

The training set divides evenly into global batches, so every step of the
two-process run sees the same texts as the one-process run; with an uneven
last global batch, accelerate's sharding repeats texts from the start to fill
it, and that step's loss and update differ (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, write_jsonl

# Stated tolerances: the gradients are summed in another order, so floats drift a little.
LOSS_TOLERANCE = 1e-4  # per logged step
WEIGHT_TOLERANCE = 1e-3  # adapter weights, max abs difference (measured: 1.5e-4)
RESUME_TOLERANCE = 1e-5  # resumed vs uninterrupted, same process count: the same arithmetic


def train_command(model, train_file, test_file, valid_file, out, processes: int, batch_size: int, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    return launcher + [
        "-m", "intentlora.cli", "train", "--model", str(model), "--train", str(train_file), "--test", str(test_file),
        "--valid", str(valid_file), "--output", str(out), "--precision", "fp32", "--batch-size", str(batch_size),
        "--epochs", "1", "--lr", "5e-3", "--set", "eval.baselines=[random_head]", "--set", "lora.dropout=0",
        "--set", "train.logging_steps=1", "--set", "train.group_by_length=false",
        # The schedule as given: one epoch, no minimum step count, no early stop.
        "--set", "train.min_steps=0", "--set", "train.early_stopping_patience=null", *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers live in sessions of their own)."""
    found, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout.split()
        frontier = [int(c) for c in children]
        found += frontier
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def data(tmp_path_factory, bundled_rows):
    tmp = tmp_path_factory.mktemp("ddp-data")
    train_file = write_jsonl(tmp / "train.jsonl", bundled_rows["train"][::2][:160])  # 160 = 20 global batches of 8
    valid_file = write_jsonl(tmp / "valid.jsonl", bundled_rows["train"][1::2][:16])
    test_file = write_jsonl(tmp / "test.jsonl", bundled_rows["test"][:30])
    return train_file, test_file, valid_file


@pytest.fixture(scope="module")
def runs(tiny_qwen2, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("ddp")
    single = subprocess.run(train_command(tiny_qwen2, *data, tmp / "one", 1, 8, "--save-steps", "5"),
                            capture_output=True, text=True, env=ENV, timeout=600)
    double = subprocess.run(train_command(tiny_qwen2, *data, tmp / "two", 2, 4, "--save-steps", "5"),
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert double.returncode == 0, double.stderr[-3000:]
    return tmp, double


def losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["train"]["log_history"] if "loss" in h]


def test_two_processes_write_one_complete_run(runs):
    tmp, double = runs
    metrics = json.loads((tmp / "two" / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and metrics["train"]["global_batch_size"] == 8
    assert double.stdout.count("run saved to") == 1  # rank 0 alone reports
    assert "processes: 2; global batch 8 (4 per process x 1 accumulation x 2)" in double.stdout
    assert sorted(p.name for p in (tmp / "two").iterdir() if p.name.startswith("metrics")) == ["metrics.json"]


def test_same_global_batch_gives_the_same_model_at_every_step(runs):
    tmp, _ = runs
    one, two = (json.loads((tmp / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert one["train"]["steps"] == two["train"]["steps"] == 20
    assert losses(one) == pytest.approx(losses(two), abs=LOSS_TOLERANCE)  # every step, the last included
    a, b = (load_file(tmp / name / "adapter" / "adapter_model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_TOLERANCE
    assert one["lora"]["accuracy"] == pytest.approx(two["lora"]["accuracy"], abs=0.05)


def test_a_killed_two_process_run_resumes_from_its_checkpoint(runs, tiny_qwen2, data, tmp_path):
    """Each rank saves rng_state_<rank>.pth; the checkpoint is complete and the run continues from it, not from step 0."""
    tmp, _ = runs
    run = tmp_path / "run"
    command = train_command(tiny_qwen2, *data, run, 2, 4, "--save-steps", "5")
    with open(tmp_path / "log.txt", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=ENV, start_new_session=True)
        deadline = time.monotonic() + 300
        while not list(run.glob("checkpoints/checkpoint-*/trainer_state.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # let both ranks finish writing their RNG states
        kill_tree(process.pid)  # the launcher and both workers, as a preempted machine
        process.wait()
    checkpoints = sorted(run.glob("checkpoints/checkpoint-*"))
    assert checkpoints and not (run / "metrics.json").exists(), (tmp_path / "log.txt").read_text()[-3000:]
    assert {p.name for p in checkpoints[0].glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "starting from the beginning" not in resumed.stdout
    metrics, reference = (json.loads((r / "metrics.json").read_text()) for r in (run, tmp / "two"))
    assert metrics["train"]["resumed_from_step"] >= 5
    assert losses(metrics) == pytest.approx(losses(reference), abs=RESUME_TOLERANCE)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, tmp / "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= RESUME_TOLERANCE


RANK_ZERO_DECIDES = """
import os
from intentlora.rundir import rank_zero_decides
asked = []
def decide():
    asked.append(os.environ["RANK"])
    return "choice of rank " + os.environ["RANK"]
print(f"rank {os.environ['RANK']} got {rank_zero_decides(decide)!r}, asked {asked}", flush=True)
os._exit(0)  # as the CLI's ranks leave: a Gloo group torn down at interpreter exit can abort (docs/RELIABILITY.md)
"""


def test_rank_zero_decides_for_every_process(tmp_path):
    """A timed choice (precision auto on CPUs) is made once, by rank 0, and every process gets it."""
    script = tmp_path / "decide.py"
    script.write_text(RANK_ZERO_DECIDES)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(launcher, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0 got 'choice of rank 0', asked ['0']",
        "rank 1 got 'choice of rank 0', asked []",
    ]
