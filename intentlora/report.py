"""What people look at after a run: report.md, a self-contained report.html,
plots (matplotlib, headless) and errors.jsonl.

The tables are built once as rows and rendered twice (Markdown and HTML), so
the two reports cannot disagree.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from intentlora.data import Example  # noqa: E402
from intentlora.evaluate import misclassified  # noqa: E402
from intentlora.files import atomic_file, write_text_atomic  # noqa: E402

PLOTS = ("confusion_matrix.png", "training_curves.png", "confidence_histogram.png")


# How the report names each model in sentences.
DISPLAY_NAMES = {"random_head": "the untrained head (random_head)", "zero_shot": "zero-shot", "tfidf": "TF-IDF", "lora": "LoRA"}
# What it means when a baseline scores higher than LoRA, said plainly.
WHY_A_BASELINE_WINS = {
    "tfidf": "character n-grams with logistic regression are enough for this data as it stands (the intents are told "
             "apart by their words); LoRA may pull ahead with more examples per intent, or use the cheaper model",
    "zero_shot": "the prompted model, with no training at all, does better than the trained adapter: "
                 "check the learning rate, the epochs and the training curves",
    "random_head": "the untrained classifier does better than the trained one: training went wrong "
                   "(check the learning rate and the training curves)",
}
CLOSE_POINTS = 2.0  # a lead smaller than this, on a test set of fewer than CLOSE_TEXTS texts, may be chance
CLOSE_TEXTS = 1000


def comparison_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for each baseline, then LoRA."""
    return [*metrics["baselines"].items(), ("lora", metrics["lora"])]


def display_name(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def verdict(metrics: dict) -> list[str]:
    """Plain-language sentences on who scored highest on the test set (macro-F1), and by how much."""
    lora, n = metrics["lora"]["macro_f1"], metrics["lora"].get("n", metrics["data"]["test"])
    baselines = metrics["baselines"]
    if not baselines:
        return [f"LoRA scored {lora:.3f} macro-F1 on {n} test texts; no baseline was run (eval.baselines is empty), so nothing tells whether a simpler model would do as well."]
    sentences = []
    winners = sorted(((m["macro_f1"], name) for name, m in baselines.items() if m["macro_f1"] > lora), reverse=True)
    for score, name in winners:
        sentences.append(
            f"{display_name(name)} scored higher than LoRA on this test set by {100 * (score - lora):.1f} points of macro-F1 "
            f"({score:.3f} vs {lora:.3f}, {n} texts): {WHY_A_BASELINE_WINS.get(name, 'the simpler model is the better one here')}."
        )
    if not winners:
        best_score, best = max((m["macro_f1"], name) for name, m in baselines.items())
        lead = 100 * (lora - best_score)
        if lead == 0:
            sentences.append(f"LoRA and {display_name(best)} scored the same on this test set ({lora:.3f} macro-F1, {n} texts): the simpler model does as well.")
        else:
            sentences.append(f"LoRA scored highest on this test set: {lora:.3f} macro-F1, {lead:.1f} points above the best baseline "
                             f"({display_name(best)}, {best_score:.3f}; {n} texts).")
    margin = min(abs(100 * (m["macro_f1"] - lora)) for m in baselines.values())
    if 0 < margin < CLOSE_POINTS and n < CLOSE_TEXTS:
        sentences.append(f"A difference under {CLOSE_POINTS:g} points on {n} texts may be chance: compare on a larger test set before choosing.")
    return sentences


def caveats(metrics: dict) -> list[str]:
    """What makes the scores less than they seem: test data used for validation, texts cut short, labels the test set lacks."""
    d, lines = metrics["data"], []
    if d.get("valid_is_test"):
        lines.append("The test set was also the validation set (no --valid file and data.valid_fraction 0): it decided "
                     "early stopping (and the checkpoint, with train.select_best), so the LoRA score is optimistic. "
                     "Hold out a validation set for a fair score.")
    truncated = {split: n for split, n in (d.get("truncated") or {}).items() if n}
    if truncated:
        counts = " and ".join(f"{n} {split}" for split, n in truncated.items())
        lines.append(f"{counts} text(s) are longer than max_length={d.get('max_length')} tokens: the model saw only their start "
                     "(raise data.max_length if their ends matter).")
    absent = metrics["lora"].get("absent_labels") or []
    if absent:
        lines.append(f"Label(s) with no test example that LoRA never predicted, left out of macro-F1 (marked in the per-class table): {', '.join(absent)}.")
    return lines


def model_name(metrics: dict) -> str:
    """"LoRA (qwen2.5-coder-0.5b-instruct)": the plot titles say which model they show."""
    base = str(metrics.get("model", "")).rstrip("/").replace(":", "/").rpartition("/")[2]
    return f"LoRA ({base})" if base else "LoRA"


def write_report(run_dir: Path, metrics: dict, test: list[Example], probs: torch.Tensor) -> None:
    """Everything but metrics.json, from the metrics and the LoRA model's test probabilities."""
    labels = metrics["labels"]
    errors = misclassified(test, probs, labels)
    confidences, predicted = probs.max(-1)
    correct = [labels[p] == ex.label for p, ex in zip(predicted.tolist(), test)]
    name, d = model_name(metrics), metrics["data"]
    title = f"{name} on test ({len(test):,} texts)"
    if d.get("valid_is_test"):
        evaluated = f", evaluated on test ({d['test']:,} texts, also the validation set)"
    elif d["valid"]:
        evaluated = f", evaluated on valid ({d['valid']:,} texts)"
    else:
        evaluated = ", no validation set"
    save_figure(confusion_matrix_figure(np.array(metrics["lora"]["confusion_matrix"]), labels, title), run_dir / PLOTS[0])
    save_figure(training_curves_figure(metrics["train"]["log_history"], f"{name}: training on train ({d['train']:,} texts){evaluated}"),
                run_dir / PLOTS[1])
    save_figure(confidence_histogram_figure(confidences.tolist(), correct, title), run_dir / PLOTS[2])
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
            [label if c.get("present", True) else f"{label} (absent: not in macro-F1)", name,
             f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])]
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
        f"adapter reloaded from disk: max abs logit difference {p['reload_max_abs_diff']:.2e} (tolerance {p['tolerance']:.0e})",
        f"adapter merged into the base, compared layer by layer in float64: max abs difference {p['merge_max_abs_diff']:.2e}"
        + (f", max relative {p['merge_max_rel_diff']:.2e} (tolerance {p['merge_tolerance']:.0e})" if "merge_max_rel_diff" in p else ""),
        f"misclassified test examples: {n_errors}, listed in errors.jsonl",
    ]
    sections = [
        ("Verdict", [verdict(metrics) + caveats(metrics)]),
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


def confusion_matrix_figure(matrix: np.ndarray, labels: list[str], title: str = ""):
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
    ax.set_title(title)
    return fig


def training_curves_figure(log_history: list[dict], title: str = ""):
    """Train loss per step (left); validation loss and macro-F1 per evaluation (right), one legend below the axes."""
    steps = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["epoch"], h["eval_loss"], h.get("eval_macro_f1")) for h in log_history if "eval_loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    if steps:
        left.plot(*zip(*steps), marker="o" if len(steps) < 30 else None)  # a few logged steps are points, not a bare line
        if len(steps) == 1:  # matplotlib would stretch a single step over fractional ticks
            left.set_xlim(steps[0][0] - 1, steps[0][0] + 1)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("train loss per step")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evals:
        epochs, losses, f1s = zip(*evals)
        handles = right.plot(epochs, losses, "o-", label="validation loss")
        f1_axis = right.twinx()
        handles += f1_axis.plot(epochs, f1s, "s-", color="tab:green", label="validation macro-F1")
        f1_axis.set_ylim(0, 1.05)
        f1_axis.set_ylabel("macro-F1")
        # Two axes share the panel: one legend, outside it, covers no point of either.
        right.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        right.set_xlim(min(epochs) - 0.25, max(epochs) + 0.25)
    else:
        right.text(0.5, 0.5, "no evaluation during training\n(no validation set)", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no ticks at 1.25
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    right.set_title("validation per evaluation")
    fig.suptitle(title)
    fig.tight_layout()  # makes room for the legend below the axes
    return fig


def confidence_histogram_figure(confidences: list[float], correct: list[bool], title: str = ""):
    conf = np.array(confidences)
    ok = np.array(correct, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    ax.hist([conf[ok], conf[~ok]], bins=bins, label=["correct", "wrong"], color=["tab:blue", "tab:red"], stacked=True)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("test examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    ax.set_title(title)
    return fig


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path, "wb") as f:  # never a truncated PNG
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")  # the legend below the axes stays in the picture
    plt.close(fig)
