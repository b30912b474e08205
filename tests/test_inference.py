"""The precision rules every entry point shares (inference.resolve_precision)."""

import json

import pytest
import torch

from intentlora import inference


@pytest.fixture
def fresh_verdict(monkeypatch, tmp_path):
    """An empty model cache and no remembered bf16 verdict, before and after the test."""
    monkeypatch.setenv("INTENTLORA_CACHE", str(tmp_path))
    inference.cpu_bf16_pays.cache_clear()
    yield tmp_path
    inference.cpu_bf16_pays.cache_clear()


@pytest.mark.parametrize(("fp32_s", "bf16_s", "inference_pick", "training_pick"),
                         [(1.0, 0.5, "bf16", "bf16"), (1.0, 1.6, "fp32", "bf16-weights"), (1.0, 0.95, "fp32", "bf16-weights")])
def test_auto_on_cpu_is_bf16_only_where_it_is_measured_faster(monkeypatch, fresh_verdict, fp32_s, bf16_s, inference_pick, training_pick):
    """CPU flags say bf16 runs, not that it pays: `auto` times both once per machine and remembers the verdict.
    Where bf16 does not pay, training reads the weights in bf16 and computes in fp32."""
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(inference, "time_layer", lambda dtype: bf16_s if dtype == torch.bfloat16 else fp32_s)
    assert inference.resolve_precision("auto", "cpu") == inference_pick
    assert inference.resolve_precision("auto", "cpu", training=True) == training_pick
    assert inference.resolve_precision("fp32", "cpu", training=True) == "fp32"
    assert inference.resolve_precision("bf16", "cpu", training=True) == "bf16"
    [(machine, verdict)] = json.loads((fresh_verdict / "cpu_bf16.json").read_text()).items()
    assert "torch" in machine and verdict["bf16_speedup"] == round(fp32_s / bf16_s, 3)

    # a later process on the same machine reads the verdict instead of timing again
    inference.cpu_bf16_pays.cache_clear()
    monkeypatch.setattr(inference, "time_layer", lambda dtype: pytest.fail("timed again"))
    assert inference.resolve_precision("auto", "cpu", training=True) == training_pick


def test_auto_without_bf16_instructions_needs_no_timing(monkeypatch, fresh_verdict):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "time_layer", lambda dtype: pytest.fail("no bf16 units: nothing to time"))
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    assert inference.resolve_precision("auto", "cpu", training=True) == "bf16-weights"
    assert not (fresh_verdict / "cpu_bf16.json").exists()


def test_bf16_weights_is_a_training_precision_only():
    assert inference.training_dtypes("bf16-weights") == (torch.bfloat16, torch.float32)
    assert inference.training_dtypes("bf16") == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        inference.resolve_precision("bf16-weights")
    with pytest.raises(ValueError, match="fp32 or bf16-weights"):
        inference.resolve_precision("fp16", training=True)


def test_the_bf16_timing_runs_and_is_positive():
    assert inference.time_layer(torch.float32, tokens=8, size=(32, 64), repeats=2) > 0
