"""The training recipe, top to bottom:

config -> data -> model + LoRA -> baselines -> fit -> save adapter
-> reload + merge parity -> final evaluation -> report -> metrics.json
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from intentlora.config import Config, load_config, save_config
from intentlora.data import Example, Splits, load_splits
from intentlora.files import publish_dir, staging_dir, write_text_atomic
from intentlora.evaluate import classification_metrics, evaluate_model, tfidf_baseline, zero_shot_baseline
from intentlora.models import (
    add_lora,
    check_4bit_supported,
    dir_size_mb,
    keep_head_fp32,
    load_adapter,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    parameter_counts,
    precision_dtype,
    resolve_model_path,
    resolve_precision,
)
from intentlora.predict import batched_logits
from intentlora.report import write_report

PARITY_TOLERANCE = 1e-4  # max abs logit difference
PARITY_PROBE = 32  # test texts used for the logit comparisons


# What HF Trainer writes into checkpoint-N for a PEFT model, trainer_state.json
# last: a checkpoint without all of them was cut off while being written.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


class ParityError(RuntimeError):
    """The saved artifacts do not reproduce the trained model."""


class ResumeError(ValueError):
    """The output folder holds a run that cannot be continued, or started over, as asked."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict


def train(cfg: Config, echo=print, resume: bool = False) -> RunResult:
    """The whole recipe; with `resume`, an unfinished run in cfg.output.dir continues from its last complete checkpoint."""
    check_settings(cfg)
    set_seed(cfg.train.seed)
    main, world_size = is_main_process(), process_count()
    if not main:  # under torchrun / accelerate launch, rank 0 alone speaks and writes
        echo = lambda _: None  # noqa: E731
    splits = load_data(cfg)
    for problem in splits.problems:
        echo(str(problem))
    shown = ", ".join(splits.labels[:12]) + (f", ... ({len(splits.labels)} in all)" if len(splits.labels) > 12 else "")
    echo(f"data: {len(splits.train)} train, {len(splits.valid)} valid, {len(splits.test)} test; labels: {shown}")
    run_dir = make_run_dir(cfg.output.dir)
    checkpoint = resume_point(run_dir, cfg, resume, echo)
    if main:
        save_config(cfg, run_dir / "config.yaml")  # now, so that a resumed run can check it continues the same config

    precision = resolve_precision(cfg.train.precision)
    model_path = resolve_model_path(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    base = load_classifier(
        model_path, splits.labels, tokenizer.pad_token_id, precision_dtype(precision),
        cfg.model.trust_remote_code, cfg.model.revision, cfg.model.allow_pickle, cfg.model.load_in_4bit,
    )
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)  # QLoRA: fp32 norms, input grads for checkpointing
    model = add_lora(base, cfg.lora)
    trainable, total = parameter_counts(model)
    echo(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # The other processes wait for rank 0 at the first collective (the DDP
    # setup in trainer.train), well within its timeout for any sane test set.
    baselines = run_baselines(model, tokenizer, splits, cfg, model_path, precision, echo) if main else {}

    trainer = build_trainer(model, tokenizer, splits, cfg, run_dir, precision)
    t = cfg.train
    global_batch = t.batch_size * t.grad_accum * world_size
    echo(f"processes: {world_size}; global batch {global_batch} ({t.batch_size} per process x {t.grad_accum} accumulation x {world_size}); lr {t.lr}")
    tokens = TokenCounter()
    hook = model.register_forward_pre_hook(tokens, with_kwargs=True)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    hook.remove()
    resumed_step = checkpoint_step(checkpoint) if checkpoint else 0
    trained_here = 1 - resumed_step / max(trainer.state.global_step, 1)  # the share of training this process did
    # Throughput counts training alone: the per-epoch evaluations are timed apart.
    evaluating = sum(e.get("eval_runtime", 0.0) for e in trainer.state.log_history if e.get("step", 0) > resumed_step)
    training = max(seconds - evaluating, 1e-9)
    if not main:
        return RunResult(run_dir, {})

    adapter_dir = save_run(trainer.model, splits.labels, run_dir)
    trained = probe_logits(trainer.model, tokenizer, splits, cfg)
    state = trainer.state
    # The merge check holds a float64 copy (8 bytes a parameter): free the trained model first.
    del trainer, model, base
    gc.collect()
    parity, merged = verify_saved_adapter(trained, tokenizer, splits, cfg, model_path, adapter_dir, precision)
    start = time.perf_counter()
    lora_metrics, probs = evaluate(merged, tokenizer, splits.test, splits.labels, cfg)
    eval_seconds = time.perf_counter() - start

    metrics = {
        "labels": splits.labels,
        "model": cfg.model.name,
        "baselines": baselines,
        "lora": lora_metrics,
        "train": {
            "seconds": round(seconds, 2),
            "eval_during_training_s": round(evaluating, 2),
            "samples_per_s": round(len(splits.train) * cfg.train.epochs * trained_here / training, 3),
            # Counted on rank 0; the other processes see as many batches.
            "real_tokens_per_s": round(tokens.real * world_size / training, 1),
            "padded_tokens_per_s": round(tokens.padded * world_size / training, 1),
            "padding_share": round(1 - tokens.real / max(tokens.padded, 1), 4),
            "eval_seconds": round(eval_seconds, 2),
            "eval_samples_per_s": round(len(splits.test) / eval_seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "precision": precision,
            "epochs": cfg.train.epochs,
            "lr": t.lr,
            "processes": world_size,
            "global_batch_size": global_batch,
            "steps": state.global_step,
            "resumed_from_step": resumed_step or None,
            "best_checkpoint": state.best_model_checkpoint,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "adapter_size_mb": round(dir_size_mb(adapter_dir), 3),
            "log_history": state.log_history,
        },
        "parity": parity,
        "data": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test),
                 "warnings": [str(p) for p in splits.problems]},
    }
    write_report(run_dir, metrics, splits.test, probs)
    # metrics.json last: its presence marks a complete run.
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    return RunResult(run_dir, metrics)


def check_settings(cfg: Config) -> None:
    """What would otherwise fail mid-run, after data and model have loaded."""
    if cfg.train.save_steps is not None and cfg.train.save_steps < 1:
        raise ValueError(f"train.save_steps must be a positive number of steps (or none: every epoch), got {cfg.train.save_steps}")
    if cfg.model.load_in_4bit:
        check_4bit_supported()


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (both set RANK), or a plain process."""
    return int(os.environ.get("RANK", 0)) == 0


def process_count() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def make_run_dir(path: str | None) -> Path:
    run_dir = Path(path) if path else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_point(run_dir: Path, cfg: Config, resume: bool, echo=print) -> Path | None:
    """The checkpoint to continue from, or None to start afresh.

    An unfinished run (checkpoints, no metrics.json) is continued only when
    asked, and only with the config it started with; without `resume` it is
    refused, not overwritten. A finished run started over loses its
    metrics.json first, so the folder never looks complete half-way through,
    and its checkpoints, which HF Trainer would take for the newest.
    """
    checkpoints = run_dir / "checkpoints"
    finished = (run_dir / "metrics.json").is_file()
    unfinished = not finished and any(checkpoints.glob("checkpoint-*"))
    if not resume:
        if unfinished:
            raise ResumeError(f"{run_dir} holds an unfinished run (checkpoints but no metrics.json): add --resume to continue it, or choose another --output")
        if is_main_process():
            (run_dir / "metrics.json").unlink(missing_ok=True)
            shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    if finished:
        raise ResumeError(f"{run_dir} is a finished run (it has metrics.json): nothing to resume")
    if not is_main_process():  # rank 0 checks, cleans up and fixes the state; the others only read
        return last_checkpoint(checkpoints)
    check_same_config(run_dir, cfg)
    for folder in checkpoints.glob("checkpoint-*"):
        if not is_complete_checkpoint(folder):
            echo(f"removing {folder}: incomplete (cut off while being written)")
            shutil.rmtree(folder)
    checkpoint = last_checkpoint(checkpoints)
    if checkpoint is None:
        echo(f"nothing to resume in {run_dir}: starting from the beginning")
        return None
    relocate_best_checkpoint(checkpoint)
    echo(f"resuming from {checkpoint}")
    return checkpoint


def is_complete_checkpoint(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def relocate_best_checkpoint(checkpoint: Path) -> None:
    """Point the saved state's best checkpoint into this folder.

    trainer_state.json names it by the path it had when saved; if the run
    folder moved (or a relative --output meets another working directory),
    HF Trainer would forget it and ship the last weights instead of the best.
    """
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("best_model_checkpoint"):
        state["best_model_checkpoint"] = str(checkpoint.parent / Path(state["best_model_checkpoint"]).name)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, state_file)  # never a half-written state: that would make the checkpoint incomplete


def checkpoint_step(folder: Path) -> int:
    """N of checkpoint-N; -1 for a folder not named so."""
    tail = folder.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def last_checkpoint(checkpoints: Path) -> Path | None:
    complete = [folder for folder in checkpoints.glob("checkpoint-*") if is_complete_checkpoint(folder)]
    return max(complete, key=checkpoint_step, default=None)


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """Resuming with another config would mix two runs in one adapter."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before, now = flat_config(load_config(saved)), flat_config(cfg)
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if changed:
        raise ResumeError(f"{run_dir} was started with another config; resume with the same settings, or choose another --output. Changed: {'; '.join(changed)}")


def flat_config(cfg: Config) -> dict:
    """{"section.key": value}, but output.dir: a run folder may be moved before it is resumed."""
    flat = {f"{section}.{key}": value for section, values in dataclasses.asdict(cfg).items() for key, value in values.items()}
    del flat["output.dir"]
    return flat


def load_data(cfg: Config) -> Splits:
    d = cfg.data
    return load_splits(
        d.train, d.test, d.valid, d.labels, d.drop_unknown, d.valid_fraction,
        d.max_train_samples, d.max_test_samples, d.text_field, d.label_field, cfg.train.seed,
    )


def evaluate(model, tokenizer, examples: list[Example], labels: list[str], cfg: Config) -> tuple[dict, torch.Tensor]:
    return evaluate_model(model, tokenizer, examples, labels, cfg.train.eval_batch_size, cfg.data.max_length, cfg.train.pad_to_max_length)


def run_baselines(classifier, tokenizer, splits: Splits, cfg: Config, model_path: str, precision: str, echo=print) -> dict:
    """The numbers LoRA has to beat, on the same test set and metrics."""
    results = {}
    for name in cfg.eval.baselines:
        if name == "random_head":
            echo("baseline random_head: the untrained classifier, as the reference recipe reports it")
            results[name], _ = evaluate(classifier, tokenizer, splits.test, splits.labels, cfg)
        elif name == "tfidf":
            echo("baseline tfidf: character n-gram TF-IDF + logistic regression on the same train split")
            results[name] = tfidf_baseline(splits.train, splits.test, splits.labels)
        elif name == "zero_shot":
            if not tokenizer.chat_template:
                echo("baseline zero_shot skipped: the model has no chat template (not an instruct model)")
                continue
            echo("baseline zero_shot: the instruct model prompted with the intents, each label scored by likelihood")
            lm = load_causal_lm(
                model_path, precision_dtype(precision), cfg.model.trust_remote_code, cfg.model.revision,
                cfg.model.allow_pickle, cfg.model.load_in_4bit,
            )
            results[name] = zero_shot_baseline(lm, tokenizer, splits.test, splits.labels, cfg.eval.label_descriptions)
            del lm
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from random_head, zero_shot, tfidf")
    return results


def tokenize(tokenizer, examples: list[Example], labels: list[str], cfg: Config) -> Dataset:
    """Token ids only: padding happens per batch in the collator (dynamic padding)."""
    label2id = {label: i for i, label in enumerate(labels)}
    padding = "max_length" if cfg.train.pad_to_max_length else False
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=cfg.data.max_length, padding=padding)
    return Dataset.from_dict({
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": [label2id[ex.label] for ex in examples],
        "length": [len(ids) for ids in enc["input_ids"]],
    })


def build_trainer(model, tokenizer, splits: Splits, cfg: Config, run_dir: Path, precision: str) -> Trainer:
    t = cfg.train
    # Evaluate whenever a checkpoint is saved: picking the best one needs both on the same schedule.
    schedule = "steps" if t.save_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        bf16=precision == "bf16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (LoRA) as is
        use_cpu=not torch.cuda.is_available(),  # accelerate refuses bf16 on CPU otherwise
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy=schedule,
        save_strategy=schedule,
        **({"eval_steps": t.save_steps, "save_steps": t.save_steps} if t.save_steps else {}),
        save_total_limit=1,  # with load_best_model_at_end: the best and the latest are kept
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_steps=t.logging_steps,
        report_to="none",
        # The classification loss is a mean per example, not a token sum: HF's
        # cross-process token averaging would multiply it by the process count.
        average_tokens_across_devices=False,
        disable_tqdm=False,
    )

    def compute_metrics(prediction) -> dict:
        m = classification_metrics(prediction.label_ids.tolist(), prediction.predictions.argmax(-1).tolist(), splits.labels)
        return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]}

    return LengthBucketTrainer(
        model=model,
        args=args,
        train_dataset=tokenize(tokenizer, splits.train, splits.labels, cfg),
        eval_dataset=tokenize(tokenizer, splits.valid, splits.labels, cfg),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of texts of similar length, in random order.

    HF's group_by_length sorts within megabatches of len(data) / 4 texts on
    small sets, which left 23% of the bundled data's batch tokens as padding.
    Sorting within spans of 50 batches (all of a small set), then shuffling
    whole batches, pads a few percent and still varies the batches and their
    order every epoch. The global torch RNG drives it, as it drives HF's
    samplers, so a resumed run replays the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, span_batches: int = 50):
        self.lengths, self.batch_size, self.span = list(lengths), batch_size, batch_size * span_batches

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths)).tolist()
        batches = []
        for start in range(0, len(order), self.span):
            span = sorted(order[start : start + self.span], key=self.lengths.__getitem__)
            batches += [span[i : i + self.batch_size] for i in range(0, len(span), self.batch_size)]
        # A short batch (there is at most one) goes last, so the loader's batch boundaries stay aligned.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in torch.randperm(len(full)).tolist():
            yield from full[i]
        for batch in short:
            yield from batch


class LengthBucketTrainer(Trainer):
    """The HF Trainer with LengthBucketSampler for group_by_length."""

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = dataset["length"] if "length" in dataset.column_names else [len(ids) for ids in dataset["input_ids"]]
        return LengthBucketSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps)


class TokenCounter:
    """Counts the real and the padded tokens of training forward passes: padding is compute spent on nothing."""

    def __init__(self):
        self.real = self.padded = 0

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:  # not the per-epoch evaluation
            self.real += int(mask.sum())
            self.padded += mask.numel()


def save_run(model, labels: list[str], run_dir: Path) -> Path:
    tmp = staging_dir(run_dir / "adapter")
    model.save_pretrained(tmp, safe_serialization=True)
    adapter_dir = publish_dir(tmp, run_dir / "adapter")
    write_text_atomic(run_dir / "labels.json", json.dumps(labels, ensure_ascii=False, indent=2))
    return adapter_dir


def probe_logits(model, tokenizer, splits: Splits, cfg: Config) -> torch.Tensor:
    """Logits on the first test texts: what a saved, reloaded or merged adapter must reproduce."""
    probe = [ex.text for ex in splits.test[:PARITY_PROBE]]
    return batched_logits(model, tokenizer, probe, cfg.train.eval_batch_size, cfg.data.max_length)


def verify_saved_adapter(trained: torch.Tensor, tokenizer, splits: Splits, cfg: Config, model_path: str, adapter_dir: Path, precision: str):
    """Reload the adapter from disk and merge it; both must give the `trained` probe_logits.

    The reload is compared in the training precision (it must match exactly).
    The merge is compared in float64: in fp32 a 24-layer model's logits move by
    ~1e-4 from kernel choice alone (batch of 1 vs padded batch), which would
    hide the difference between a correct merge and a subtly wrong one.
    Returns the parity figures and the merged model in the training precision
    (head fp32): the final evaluation scores the saved artifact, at the speed
    the hardware allows (bf16 doubles CPU throughput; see docs/BENCHMARKS.md).
    """
    logits = lambda m: probe_logits(m, tokenizer, splits, cfg)  # noqa: E731
    load = lambda dtype, load_in_4bit=False: load_classifier(  # noqa: E731
        model_path, splits.labels, tokenizer.pad_token_id, dtype, cfg.model.trust_remote_code, cfg.model.revision,
        cfg.model.allow_pickle, load_in_4bit,
    )
    reloaded = load_adapter(load(precision_dtype(precision), cfg.model.load_in_4bit), adapter_dir)
    reload_diff = (logits(reloaded) - trained).abs().max().item()
    del reloaded

    unmerged = load_adapter(load(torch.float64), adapter_dir)
    before_merge = logits(unmerged)
    merged = unmerged.merge_and_unload()
    merge_diff = (logits(merged) - before_merge).abs().max().item()

    parity = {
        "reload_max_abs_diff": reload_diff,
        "merge_max_abs_diff": merge_diff,
        "tolerance": PARITY_TOLERANCE,
        "probe_texts": len(trained),
    }
    if reload_diff > PARITY_TOLERANCE or merge_diff > PARITY_TOLERANCE:
        raise ParityError(f"saved adapter does not reproduce the trained model: {parity}")
    return parity, keep_head_fp32(merged.to(precision_dtype(precision)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
