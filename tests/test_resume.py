"""Interruptions: a training process killed with SIGKILL resumes into the run an uninterrupted one gives.

The runs are fp32 on CPU with a fixed seed and LoRA dropout 0.05 (the masks are random);
HF Trainer's checkpoints carry the optimizer, scheduler and RNG states, so
resuming reproduces the uninterrupted run (measured: exactly, 0.0 difference).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from intentlora.cli import EXIT_INPUT, app
from intentlora.rundir import CHECKPOINT_FILES, is_complete_checkpoint
from tests.conftest import ROOT, write_jsonl

runner = CliRunner()
SAVE_STEPS = 5
# Max abs difference allowed between resumed and uninterrupted adapter weights
# and losses (quoted in docs/RELIABILITY.md).
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here on one CPU thread (the subprocess too): the same kernels in each, and a tiny model runs
    faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory, bundled_rows) -> tuple[Path, Path]:
    """100 train rows: 23 steps of 4 per epoch, 46 in all, so a kill after step 5 lands well before the end."""
    folder = tmp_path_factory.mktemp("resume-data")
    return write_jsonl(folder / "train.jsonl", bundled_rows["train"][:100]), write_jsonl(folder / "test.jsonl", bundled_rows["test"][:20])


def train_args(model: Path, data: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    train_file, test_file = data
    return ["train", "--model", str(model), "--train", str(train_file), "--test", str(test_file), "--epochs", "2",
            "--batch-size", "4", "--lr", "5e-3", "--precision", "fp32", "--save-steps", str(SAVE_STEPS),
            "--output", str(output), "--set", "eval.baselines=[]",
            "--set", "train.min_steps=0", "--set", "train.early_stopping_patience=null", "--set", "lora.dropout=0.05", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_qwen2, data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = runner.invoke(app, train_args(tiny_qwen2, data, run))
    assert result.exit_code == 0, result.output
    return run


def complete_checkpoints(run: Path) -> list[Path]:
    return [c for c in (run / "checkpoints").glob("checkpoint-*") if is_complete_checkpoint(c)]


def kill_after_checkpoint(command: list[str], run: Path, log_file: Path, min_step: int = 1) -> None:
    """Start `command`, SIGKILL its whole process group once a complete checkpoint at `min_step` or later exists."""
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while (not any(step(c) >= min_step for c in complete_checkpoints(run)) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # no handler, no cleanup, as when a machine is preempted
        process.wait()
    assert process.returncode == -signal.SIGKILL, log_file.read_text()
    assert complete_checkpoints(run) and not (run / "metrics.json").exists()


@pytest.fixture(scope="module")
def killed(tiny_qwen2, data, tmp_path_factory) -> Path:
    """A run whose process got SIGKILL as soon as its first checkpoint was complete."""
    folder = tmp_path_factory.mktemp("killed")
    kill_after_checkpoint([sys.executable, "-m", "intentlora.cli", *train_args(tiny_qwen2, data, folder / "run")], folder / "run", folder / "log.txt")
    return folder / "run"


def step(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


# What training computes, step by step; timings and HF's train_loss (averaged
# over the steps one process ran) are left out.
HISTORY_KEYS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "eval_macro_f1", "eval_accuracy")


def history(run: Path) -> list[dict]:
    entries = json.loads((run / "metrics.json").read_text())["train"]["log_history"]
    return [{k: v for k, v in entry.items() if k in HISTORY_KEYS} for entry in entries if "train_loss" not in entry]


def max_difference(resumed: list[dict], reference: list[dict]) -> float:
    assert [sorted(e) for e in resumed] == [sorted(e) for e in reference]
    return max(abs(a[k] - b[k]) for a, b in zip(resumed, reference) for k in a)


def test_kill_9_then_resume_gives_the_uninterrupted_run(killed, uninterrupted, tiny_qwen2, data, tmp_path):
    run = shutil.copytree(killed, tmp_path / "run")
    last = max(complete_checkpoints(run), key=step)
    # A checkpoint cut off while being written: weights there, trainer_state.json not yet.
    cut_off = run / "checkpoints" / f"checkpoint-{step(last) + SAVE_STEPS}"
    cut_off.mkdir()
    shutil.copy(last / CHECKPOINT_FILES[0], cut_off)

    result = runner.invoke(app, train_args(tiny_qwen2, data, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert f"removing {cut_off}: incomplete" in result.output
    assert f"resuming from {last}" in result.output

    metrics, expected = (json.loads((r / "metrics.json").read_text()) for r in (run, uninterrupted))
    assert metrics["train"]["resumed_from_step"] == step(last) < metrics["train"]["steps"] == expected["train"]["steps"]
    # Every logged training loss and every evaluation after the resume point is
    # a function of the weights at that step: equal histories, equal training.
    assert max_difference(history(run), history(uninterrupted)) <= TOLERANCE
    best = Path(metrics["train"]["best_checkpoint"])
    assert best.parent == run / "checkpoints" and best.name == Path(expected["train"]["best_checkpoint"]).name  # found after the move
    resumed, reference = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, uninterrupted))
    assert resumed.keys() == reference.keys()
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) <= TOLERANCE
    assert metrics["lora"]["accuracy"] == expected["lora"]["accuracy"]
    assert metrics["lora"]["macro_f1"] == pytest.approx(expected["lora"]["macro_f1"], abs=TOLERANCE)


STEPS_PER_EPOCH = 23  # 90 training rows (100 less the 10% validation share) in batches of 4


# Runs `intentlora` with a callback that SIGKILLs the process right after the
# first checkpoint at or past a step: a preemption at a known point, however
# fast the tiny model trains.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from transformers import TrainerCallback
import intentlora.train as recipe

AT_STEP = int(sys.argv[1])

class Preempt(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

build = recipe.build_trainer
recipe.build_trainer = lambda *a, **k: (lambda trainer: trainer.add_callback(Preempt()) or trainer)(build(*a, **k))
sys.argv = ["intentlora", *sys.argv[2:]]
from intentlora.cli import app
app()
"""


def test_kill_9_in_the_second_epoch_with_length_buckets_resumes_exactly(uninterrupted, tiny_qwen2, data, tmp_path):
    """The bucket sampler's order is a function of (seed, epoch): a resume in epoch 2 replays epoch 2's batches."""
    run = tmp_path / "run"
    command = [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(STEPS_PER_EPOCH + 1), *train_args(tiny_qwen2, data, run)]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed_from = max(complete_checkpoints(run), key=step)
    assert step(resumed_from) > STEPS_PER_EPOCH and not (run / "metrics.json").exists()
    result = runner.invoke(app, train_args(tiny_qwen2, data, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert f"resuming from {resumed_from}" in result.output
    assert max_difference(history(run), history(uninterrupted)) <= TOLERANCE
    resumed, reference = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, uninterrupted))
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) <= TOLERANCE


def test_an_unfinished_run_is_refused_until_resumed(killed, tiny_qwen2, data):
    """eval and predict refuse it (no metrics.json); train neither overwrites it nor resumes it with another config."""
    test_file = data[1]
    for args in (["eval", "--adapter", str(killed), "--data", str(test_file)], ["predict", "-m", str(killed), "查余额"]):
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_INPUT and "incomplete run (no metrics.json)" in result.output, result.output
    again = runner.invoke(app, train_args(tiny_qwen2, data, killed))
    assert again.exit_code == EXIT_INPUT and "holds an unfinished run" in again.output and "--resume" in again.output
    other = runner.invoke(app, train_args(tiny_qwen2, data, killed, "--resume", "--seed", "7"))
    assert other.exit_code == EXIT_INPUT and "train.seed: 42 -> 7" in other.output
    assert not (killed / "metrics.json").exists() and complete_checkpoints(killed)


def test_resume_of_a_finished_run_or_without_output_is_refused(uninterrupted, tiny_qwen2, data):
    finished = runner.invoke(app, train_args(tiny_qwen2, data, uninterrupted, "--resume"))
    assert finished.exit_code == EXIT_INPUT and "finished run" in finished.output
    assert (uninterrupted / "metrics.json").exists()
    assert runner.invoke(app, ["train", "--resume"]).exit_code == 2
    zero = runner.invoke(app, ["train", "--save-steps", "0", "--train", "missing.jsonl"])
    assert zero.exit_code == EXIT_INPUT and "train.save_steps must be a positive number" in zero.output


def test_a_restarted_finished_run_stops_looking_complete_at_once(uninterrupted, pickled_qwen2, data, tmp_path):
    """Started over (here failing at the model), a finished folder loses its metrics.json and old checkpoints first."""
    run = shutil.copytree(uninterrupted, tmp_path / "run")
    result = runner.invoke(app, train_args(pickled_qwen2, data, run))
    assert result.exit_code == EXIT_INPUT and "pickle files only" in result.output
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()


def test_resume_with_nothing_to_resume_starts_from_the_beginning(pickled_qwen2, data, tmp_path):
    """So a job scheduler can run the same `--resume` command the first time and after every preemption."""
    result = runner.invoke(app, train_args(pickled_qwen2, data, tmp_path / "run", "--resume"))
    assert f"nothing to resume in {tmp_path / 'run'}: starting from the beginning" in result.output
    assert result.exit_code == EXIT_INPUT and "pickle files only" in result.output  # it went on to load the model
