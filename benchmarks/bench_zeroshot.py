"""Zero-shot baseline cost: texts/s of `zero_shot_scores` on BANKING77's 77 labels, against the method it replaced.

    python benchmarks/bench_zeroshot.py --texts 16                   # the current method only
    python benchmarks/bench_zeroshot.py --texts 16 --compare 07927765 # also the method at that commit, same texts

`--compare COMMIT` loads intentlora/zeroshot.py as it was at COMMIT (git show)
and runs it on the same model, texts and labels: both timings and the largest
difference between the two score matrices are printed (they must agree to
float noise). The model is the 0.5B offline instruct model in its default
zero-shot precision (`auto`: bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT.parent / "shared" / "datasets" / "banking77"


def load_old(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:intentlora/zeroshot.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("zeroshot_old")
    exec(compile(source, f"{commit}:intentlora/zeroshot.py", "exec"), module.__dict__)
    return module


def timed(score, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = score(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", type=Path, default=BANKING77, help="Folder with train.jsonl (labels) and test.jsonl (texts).")
    parser.add_argument("--texts", type=int, default=16, help="The first N test texts.")
    parser.add_argument("--compare", metavar="COMMIT", help="Also time intentlora/zeroshot.py as it was at COMMIT.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.data / "test.jsonl").is_file():
        sys.exit(f"{args.data}: no test.jsonl (the shared datasets are not here)")

    import torch
    from transformers.utils import logging as hf_logging

    from intentlora.inference import precision_dtype
    from intentlora.models import load_causal_lm, load_tokenizer, resolve_model_path
    from intentlora.zeroshot import zero_shot_scores

    hf_logging.set_verbosity_error()
    rows = lambda split: [json.loads(line) for line in (args.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]  # noqa: E731
    labels = sorted({r["label"] for r in rows("train")})
    texts = [r["text"] for r in rows("test")[: args.texts]]
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, precision_dtype("auto"))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{args.model} ({dtype}), {len(texts)} texts x {len(labels)} labels, torch threads {torch.get_num_threads()}", flush=True)
    seconds, new = timed(zero_shot_scores, model, tokenizer, texts, labels)
    result = {"model": args.model, "dtype": dtype, "texts": len(texts), "labels": len(labels), "new_s": seconds}
    print(f"current method: {seconds:.1f} s, {len(texts) / seconds:.2f} texts/s", flush=True)
    if args.compare:
        old_seconds, old = timed(load_old(args.compare).zero_shot_scores, model, tokenizer, texts, labels)
        diff = (new - old).abs().max().item()
        agree = (new.argmax(-1) == old.argmax(-1)).float().mean().item()
        result.update(old_s=old_seconds, speedup=old_seconds / seconds, max_abs_diff=diff, top1_agreement=agree)
        print(f"method at {args.compare}: {old_seconds:.1f} s, {len(texts) / old_seconds:.2f} texts/s; "
              f"speed-up {old_seconds / seconds:.1f}x; largest score difference {diff:.2e} (log-likelihood), top-1 agreement {agree:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
