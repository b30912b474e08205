"""The human-readable side of a run: report.md and the before/after table."""

from __future__ import annotations

from pathlib import Path


def comparison_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for each baseline, then LoRA."""
    return [*metrics["baselines"].items(), ("lora", metrics["lora"])]


def write_report(run_dir: Path, metrics: dict) -> Path:
    lines = [f"# intentlora run: {run_dir.name}", "", f"Model: `{metrics['model']}`", ""]
    lines += ["## Before / after (test set)", "", "| model | macro-F1 | accuracy | weighted F1 |", "|---|---|---|---|"]
    for name, m in comparison_rows(metrics):
        lines.append(f"| {name} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} | {m['weighted_f1']:.4f} |")
    lines += ["", "## Per class (LoRA)", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, c in metrics["lora"]["per_class"].items():
        lines.append(f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    t, p, d = metrics["train"], metrics["parity"], metrics["data"]
    lines += [
        "", "## Training", "",
        f"- examples: {d['train']} train, {d['valid']} valid, {d['test']} test",
        f"- {t['epochs']} epochs, {t['steps']} steps, precision {t['precision']}",
        f"- {t['seconds']} s, {t['samples_per_s']} samples/s, peak RSS {t['peak_rss_mb']} MB",
        f"- trainable params: {t['trainable_params']:,} of {t['total_params']:,} ({t['trainable_percent']}%)",
        f"- adapter on disk: {t['adapter_size_mb']} MB",
        "", "## Saved-artifact checks", "",
        f"- adapter reloaded from disk: max abs logit difference {p['reload_max_abs_diff']:.2e}",
        f"- adapter merged into the base (compared in float64): max abs logit difference {p['merge_max_abs_diff']:.2e} (tolerance {p['tolerance']:.0e})",
    ]
    if d["warnings"]:
        lines += ["", "## Data warnings", "", *[f"- {w}" for w in d["warnings"]]]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
