"""report.md / report.html and the plots: a verdict in words, the caveats, titles, ticks and legends that read right.

Metrics are computed by evaluate.classification_metrics from chosen
predictions, so every expected figure below is derived, not typed in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from intentlora.data import Example
from intentlora.evaluate import classification_metrics
from intentlora.report import (
    confidence_histogram_figure,
    confusion_matrix_figure,
    training_curves_figure,
    verdict,
    write_report,
)

LABELS = ["balance", "card_lost", "other", "refund"]
GOLD = [0, 0, 0, 1, 1, 1, 3, 3, 3, 3]  # no 'other' in the test set
GOOD = [0, 0, 0, 1, 1, 1, 3, 3, 3, 0]
POOR = [0, 1, 3, 1, 0, 1, 3, 0, 3, 0]
LOG_HISTORY = [
    {"loss": 1.4, "learning_rate": 1e-4, "epoch": 0.5, "step": 5},
    {"eval_loss": 1.1, "eval_macro_f1": 0.5, "epoch": 1.0, "step": 10},
    {"loss": 0.9, "learning_rate": 8e-5, "epoch": 1.5, "step": 15},
    {"eval_loss": 0.7, "eval_macro_f1": 0.8, "epoch": 2.0, "step": 20},
    {"loss": 0.5, "learning_rate": 4e-5, "epoch": 2.5, "step": 25},
    {"eval_loss": 0.6, "eval_macro_f1": 0.85, "epoch": 3.0, "step": 30},
]


def run_metrics(lora_pred: list[int], baselines: dict[str, list[int]], **data) -> dict:
    """A metrics.json as train writes it, for the predictions given."""
    return {
        "labels": LABELS,
        "model": "pypi:qwen2.5-coder-0.5b-instruct",
        "baselines": {name: classification_metrics(GOLD, pred, LABELS) for name, pred in baselines.items()},
        "lora": classification_metrics(GOLD, lora_pred, LABELS),
        "train": {"epochs": 3, "steps": 30, "precision": "fp32", "seconds": 12.5, "samples_per_s": 9.6, "peak_rss_mb": 2900.0,
                  "trainable_params": 1000, "total_params": 100000, "trainable_percent": 1.0, "adapter_size_mb": 0.5,
                  "log_history": LOG_HISTORY},
        "parity": {"reload_max_abs_diff": 1e-6, "tolerance": 1e-4, "merge_max_abs_diff": 2e-6, "merge_max_rel_diff": 3e-7,
                   "merge_tolerance": 1e-5},
        "data": {"train": 40, "valid": 5, "test": len(GOLD), "valid_is_test": False, "truncated": {"train": 0, "test": 0},
                 "max_length": 128, "warnings": [], **data},
    }


def write(tmp_path, metrics: dict, lora_pred: list[int]) -> tuple[str, str]:
    """write_report on test examples and probabilities that agree with `lora_pred`: (report.md, report.html)."""
    test = [Example(f"text {i}", LABELS[g], f"test.jsonl:{i + 1}") for i, g in enumerate(GOLD)]
    probs = torch.full((len(GOLD), len(LABELS)), 0.1)
    probs[torch.arange(len(GOLD)), torch.tensor(lora_pred)] = 0.7
    run = tmp_path / "run"
    run.mkdir()
    write_report(run, metrics, test, probs)
    for plot in ("confusion_matrix.png", "training_curves.png", "confidence_histogram.png"):
        assert (run / plot).read_bytes().startswith(b"\x89PNG")
    return (run / "report.md").read_text(encoding="utf-8"), (run / "report.html").read_text(encoding="utf-8")


def test_report_says_in_words_when_a_baseline_beats_lora(tmp_path):
    metrics = run_metrics(POOR, {"random_head": [2] * 10, "tfidf": GOOD})
    points = 100 * (metrics["baselines"]["tfidf"]["macro_f1"] - metrics["lora"]["macro_f1"])
    assert points > 0
    md, html = write(tmp_path, metrics, POOR)
    sentence = f"TF-IDF scored higher than LoRA on this test set by {points:.1f} points of macro-F1"
    assert sentence in md and sentence in html
    assert "random_head" not in " ".join(verdict(metrics))  # it scored lower: not a winner
    assert md.index("## Verdict") < md.index("## Baselines vs LoRA")


def test_report_says_when_lora_wins_and_by_how_much(tmp_path):
    metrics = run_metrics(GOOD, {"random_head": [2] * 10, "tfidf": POOR})
    lead = 100 * (metrics["lora"]["macro_f1"] - metrics["baselines"]["tfidf"]["macro_f1"])
    md, _ = write(tmp_path, metrics, GOOD)
    assert f"LoRA scored highest on this test set: {metrics['lora']['macro_f1']:.3f} macro-F1, {lead:.1f} points above the best baseline (TF-IDF" in md
    assert "scored higher than LoRA" not in md


def test_verdict_without_baselines_and_on_a_close_call():
    alone = verdict(run_metrics(GOOD, {}))
    assert len(alone) == 1 and "no baseline was run" in alone[0]
    close = run_metrics(GOOD, {"tfidf": GOOD[:-1] + [3]})  # one text more right than LoRA: a few points on 10 texts
    lines = verdict(close)
    assert lines[0].startswith("TF-IDF scored higher than LoRA")
    difference = 100 * (close["baselines"]["tfidf"]["macro_f1"] - close["lora"]["macro_f1"])
    assert ("may be chance" in lines[-1]) == (difference < 2)


def test_report_warns_of_test_picked_epochs_truncation_and_absent_labels(tmp_path):
    metrics = run_metrics(GOOD, {"tfidf": POOR}, valid_is_test=True, truncated={"train": 3, "test": 1})
    assert metrics["lora"]["absent_labels"] == ["other"]
    md, html = write(tmp_path, metrics, GOOD)
    assert "The test set was also the validation set" in md and "optimistic" in md
    assert "3 train and 1 test text(s) are longer than max_length=128 tokens" in md
    assert "left out of macro-F1 (marked in the per-class table): other." in md
    assert "| other (absent: not in macro-F1) | lora |" in md and "other (absent: not in macro-F1)" in html
    assert "| balance | lora |" in md  # present labels are not marked


def test_a_clean_run_has_no_caveats(tmp_path):
    metrics = run_metrics(GOOD, {"tfidf": POOR})
    metrics["lora"]["absent_labels"] = []
    md, _ = write(tmp_path, metrics, GOOD)
    for caveat in ("picked on the test set", "longer than max_length", "left out of macro-F1"):
        assert caveat not in md


def test_titles_say_which_model_and_which_split():
    fig = confusion_matrix_figure(np.eye(4, dtype=int), LABELS, "LoRA (qwen2.5-coder-0.5b-instruct) on test (10 texts)")
    assert fig.axes[0].get_title() == "LoRA (qwen2.5-coder-0.5b-instruct) on test (10 texts)"
    fig = confidence_histogram_figure([0.9, 0.8, 0.3], [True, True, False], "LoRA (m) on test (3 texts)")
    assert fig.axes[0].get_title() == "LoRA (m) on test (3 texts)"


def test_titles_in_a_written_report_name_the_model_and_the_splits(tmp_path, monkeypatch):
    import intentlora.report as report

    titles = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: titles.append((path.name, fig.texts[0].get_text() if fig.texts else fig.axes[0].get_title())))
    metrics = run_metrics(GOOD, {}, valid_is_test=True)
    test = [Example(f"t{i}", LABELS[g], f"f:{i}") for i, g in enumerate(GOLD)]
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(report, "render_html", lambda run_dir, sections: "")  # the plots were not saved
    write_report(tmp_path / "run", metrics, test, torch.eye(4)[torch.tensor(GOOD)])
    assert dict(titles) == {
        "confusion_matrix.png": "LoRA (qwen2.5-coder-0.5b-instruct) on test (10 texts)",
        "training_curves.png": "LoRA (qwen2.5-coder-0.5b-instruct): training on train (40 texts), evaluated on test (10 texts, also the validation set)",
        "confidence_histogram.png": "LoRA (qwen2.5-coder-0.5b-instruct) on test (10 texts)",
    }


def data_points(ax) -> np.ndarray:
    """Every plotted point of `ax`, in display (pixel) coordinates."""
    return np.concatenate([ax.transData.transform(line.get_xydata()) for line in ax.get_lines()])


def test_epoch_ticks_are_whole_numbers_and_the_legend_covers_no_point():
    fig = training_curves_figure(LOG_HISTORY, "title")
    fig.canvas.draw()
    right, f1_axis = fig.axes[1], fig.axes[2]
    lo, hi = right.get_xlim()
    ticks = [t for t in right.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())  # steps too
    [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]  # one legend for both curves
    assert [t.get_text() for t in legend.get_texts()] == ["validation loss", "validation macro-F1"]
    box = legend.get_window_extent()
    for ax in (right, f1_axis):
        assert not any(box.contains(x, y) for x, y in data_points(ax))
    assert not box.overlaps(right.get_window_extent())  # below the panel, not on it
    assert box.y0 >= 0  # and still inside the picture


@pytest.mark.parametrize("confidences", [[0.95, 0.9, 0.92, 0.97, 0.99, 0.3, 0.35], [0.1, 0.15, 0.2, 0.25, 0.9, 0.95]])
def test_histogram_legend_covers_no_bar(confidences):
    correct = [c > 0.5 for c in confidences]
    fig = confidence_histogram_figure(confidences, correct, "title")
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches if p.get_height() > 0]
    assert bars and not any(box.overlaps(bar) for bar in bars)
