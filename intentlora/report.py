"""What people look at after a run: report.md, a self-contained report.html,
plots (matplotlib, headless) and errors.jsonl.

The tables are built once as rows and rendered twice (Markdown and HTML), so
the two reports cannot disagree.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from intentlora.data import Example  # noqa: E402
from intentlora.evaluate import misclassified  # noqa: E402
from intentlora.files import write_text_atomic  # noqa: E402

PLOTS = ("confusion_matrix.png", "training_curves.png", "confidence_histogram.png")


def comparison_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for each baseline, then LoRA."""
    return [*metrics["baselines"].items(), ("lora", metrics["lora"])]


def write_report(run_dir: Path, metrics: dict, test: list[Example], probs: torch.Tensor) -> None:
    """Everything but metrics.json, from the metrics and the LoRA model's test probabilities."""
    labels = metrics["labels"]
    errors = misclassified(test, probs, labels)
    confidences, predicted = probs.max(-1)
    correct = [labels[p] == ex.label for p, ex in zip(predicted.tolist(), test)]
    plot_confusion_matrix(np.array(metrics["lora"]["confusion_matrix"]), labels, run_dir / PLOTS[0])
    plot_training_curves(metrics["train"]["log_history"], run_dir / PLOTS[1])
    plot_confidence_histogram(confidences.tolist(), correct, run_dir / PLOTS[2])
    write_text_atomic(run_dir / "errors.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in errors))
    sections = report_sections(run_dir, metrics, len(errors))
    write_text_atomic(run_dir / "report.md", render_markdown(run_dir.name, sections))
    write_text_atomic(run_dir / "report.html", render_html(run_dir, sections))


def report_sections(run_dir: Path, metrics: dict, n_errors: int) -> list[tuple[str, list]]:
    """[(heading, blocks)]; a block is a table (header, rows), a bullet list, or a plot file name."""
    t, p, d = metrics["train"], metrics["parity"], metrics["data"]
    comparison = (
        ["model", "macro-F1", "accuracy", "weighted F1"],
        [[name, f"{m['macro_f1']:.4f}", f"{m['accuracy']:.4f}", f"{m['weighted_f1']:.4f}"] for name, m in comparison_rows(metrics)],
    )
    per_class = (
        ["label", "model", "precision", "recall", "F1", "support"],
        [
            [label, name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])]
            for label in metrics["labels"]
            for name, m in comparison_rows(metrics)
            for c in [m["per_class"][label]]
        ],
    )
    training = [
        f"examples: {d['train']} train, {d['valid']} valid, {d['test']} test",
        f"{t['epochs']} epochs, {t['steps']} steps, precision {t['precision']}",
        f"{t['seconds']} s, {t['samples_per_s']} samples/s, peak RSS {t['peak_rss_mb']} MB",
        f"trainable params: {t['trainable_params']:,} of {t['total_params']:,} ({t['trainable_percent']}%)",
        f"adapter on disk: {t['adapter_size_mb']} MB",
    ]
    checks = [
        f"adapter reloaded from disk: max abs logit difference {p['reload_max_abs_diff']:.2e}",
        f"adapter merged into the base (compared in float64): max abs logit difference {p['merge_max_abs_diff']:.2e} (tolerance {p['tolerance']:.0e})",
        f"misclassified test examples: {n_errors}, listed in errors.jsonl",
    ]
    sections = [
        ("Baselines vs LoRA (test set)", [comparison]),
        ("Per class", [per_class]),
        ("Confusion matrix (LoRA)", [PLOTS[0]]),
        ("Training", [training, PLOTS[1]]),
        ("Confidence (LoRA)", [PLOTS[2]]),
        ("Saved-artifact checks", [checks]),
    ]
    if d["warnings"]:
        sections.append(("Data warnings", [d["warnings"]]))
    return sections


def render_markdown(title: str, sections: list) -> str:
    lines = [f"# intentlora run: {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, str):
                lines += [f"![{block}]({block})", ""]
            elif isinstance(block, tuple):
                header, rows = block
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
            else:
                lines += [f"- {item}" for item in block] + [""]
    return "\n".join(lines)


def render_html(run_dir: Path, sections: list) -> str:
    """One file with the plots inlined, so it can be mailed or attached to a ticket."""
    esc = html.escape
    body = [f"<h1>intentlora run: {esc(run_dir.name)}</h1>"]
    for heading, blocks in sections:
        body.append(f"<h2>{esc(heading)}</h2>")
        for block in blocks:
            if isinstance(block, str):
                data = base64.b64encode((run_dir / block).read_bytes()).decode()
                body.append(f'<img alt="{esc(block)}" src="data:image/png;base64,{data}">')
            elif isinstance(block, tuple):
                header, rows = block
                body.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
                body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
                body.append("</table>")
            else:
                body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block) + "</ul>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>intentlora {esc(run_dir.name)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    """Counts in the cells, colour by row share: recall per gold label at a glance."""
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= 30:
        for i, j in np.ndindex(matrix.shape):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of gold row")
    _save(fig, path)


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    steps = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["epoch"], h["eval_loss"], h.get("eval_macro_f1")) for h in log_history if "eval_loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        left.plot(*zip(*steps), label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("train loss per step")
    if evals:
        epochs, losses, f1s = zip(*evals)
        right.plot(epochs, losses, "o-", label="eval loss")
        f1_axis = right.twinx()
        f1_axis.plot(epochs, f1s, "s-", color="tab:green", label="eval macro-F1")
        f1_axis.set_ylim(0, 1)
        f1_axis.set_ylabel("macro-F1")
        right.legend(loc="lower left")
        f1_axis.legend(loc="lower right")
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    right.set_title("validation per epoch")
    _save(fig, path)


def plot_confidence_histogram(confidences: list[float], correct: list[bool], path: Path) -> None:
    conf = np.array(confidences)
    ok = np.array(correct, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    ax.hist([conf[ok], conf[~ok]], bins=bins, label=["correct", "wrong"], color=["tab:blue", "tab:red"], stacked=True)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("test examples")
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)  # never a truncated PNG
