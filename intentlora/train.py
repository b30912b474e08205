"""The training recipe, top to bottom:

    train    = setup -> fit -> finalize
    setup    : data -> run folder -> tokenizer -> baselines -> model + LoRA -> trainer
    fit      : trainer.train (resumable from checkpoints), timed apart from its evaluations
    finalize : save adapter -> reload check -> merge check -> final evaluation of the
               run as `predict` loads it -> report -> metrics.json (last)

Under torchrun / accelerate launch every process fits; rank 0 alone runs the
baselines and finalizes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft.helpers import disable_input_dtype_casting
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from intentlora.config import Config
from intentlora.console import Reporter, ReporterCallback, as_reporter
from intentlora.data import Example, Splits, load_splits, summarize
from intentlora.evaluate import classification_metrics, metrics_from_probs, tfidf_baseline
from intentlora.files import staged_dir
from intentlora.inference import (
    DEFAULT_PRECISION, apply_template, batched_logits, classifier_of, encode, resolve_device, resolve_precision, training_dtypes,
)
from intentlora.models import (
    add_lora,
    check_4bit_supported,
    check_merge,
    dir_size_mb,
    init_head,
    label_words,
    load_adapter,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    parameter_counts,
    resolve_model_path,
)
from intentlora.predict import classifier_for_run
from intentlora.tracking import PROJECT as TRACKING_PROJECT, check_report_to, finish_run, place_logs
from intentlora.report import write_report
from intentlora.rundir import (
    ADAPTER_DIR,
    checkpoint_step,
    inference_settings,
    checkpoints_dir,
    is_main_process,
    make_run_dir,
    process_count,
    rank_zero_decides,
    remove_checkpoints,
    resume_point,
    running,
    write_config,
    write_labels,
    write_metrics,
)

PARITY_PROBE = 32  # test texts used for the reload comparison
# Reloaded vs trained logits, max abs difference. On the CPU the same kernels
# run on the same inputs (measured: 0.0); GPU kernels may pick other
# reduction orders, which half precision magnifies.
RELOAD_TOLERANCE = {"fp32": 1e-4, "bf16-weights": 1e-4, "bf16": 1e-4}
RELOAD_TOLERANCE_CUDA = {"fp32": 1e-4, "bf16-weights": 1e-4, "bf16": 2e-2}
# Each LoRA layer merged alone in float64 must compute what it computed
# unmerged: float64 rounding is ~1e-15 relative, a wrong merge is off by the
# size of the LoRA update itself (1e-4 relative or more).
MERGE_TOLERANCE = 1e-9  # relative to the layer's largest output


class ParityError(RuntimeError):
    """The saved artifacts do not reproduce the trained model."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict


@dataclass
class Run:
    """What setup hands to fit and finalize."""

    cfg: Config
    splits: Splits
    run_dir: Path
    report: Reporter
    checkpoint: Path | None
    device: torch.device
    precision: str
    model_path: str
    tokenizer: object
    model: object  # PeftModel
    trainer: Trainer
    baselines: dict
    trainable: int
    total: int
    truncated: dict[str, int]  # texts cut by max_length, per split


@dataclass
class Fit:
    seconds: float  # trainer.train, wall clock
    evaluating: float  # of which the per-epoch (or per-save) evaluations
    resumed_step: int
    real_tokens: int
    padded_tokens: int
    rows: int  # training texts passed forward (each epoch counts again)
    attention: str  # the attention implementation it trained with (eager when training bf16 on a CPU)


def train(cfg: Config, echo=print, resume: bool = False) -> RunResult:
    """The whole recipe; with `resume`, an unfinished run in cfg.output.dir continues from its last complete checkpoint.

    `echo` is a console.Reporter, or any function of one line (no progress bars).
    """
    report = as_reporter(echo if is_main_process() else None)
    check_settings(cfg)
    set_seed(cfg.train.seed)
    report.phase("data", "reading and checking the data files")
    splits = load_data(cfg, report)
    run_dir = make_run_dir(cfg.output.dir)
    checkpoint = resume_point(run_dir, cfg, resume, report)
    with running(run_dir) if is_main_process() else nullcontext():
        run = setup(cfg, splits, run_dir, checkpoint, report)
        fitted = fit(run)
        if not is_main_process():  # rank 0 saves, checks and reports
            return RunResult(run_dir, {})
        return finalize(run, fitted)


# -- setup ----------------------------------------------------------------------


def setup(cfg: Config, splits: Splits, run_dir: Path, checkpoint: Path | None, report: Reporter) -> Run:
    if is_main_process():
        write_config(run_dir, cfg)  # now, so that a resumed run can check it continues the same config
    device = training_device(cfg.train.device)
    precision = training_precision(cfg.train.precision, device)
    model_path = resolve_model_path(cfg.model.name, cfg.model.revision, notify=report)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    truncated = truncated_texts(tokenizer, splits, cfg, report)

    # The other processes wait for rank 0 at the first collective (the DDP
    # setup in trainer.train), well within its timeout for any sane test set.
    baselines = run_lm_baselines(tokenizer, splits, cfg, model_path, precision, device, report) if is_main_process() else {}

    report.phase("model", f"loading {cfg.model.name} as a classifier ({describe(precision)}, {device}) and adding LoRA")
    base = load_base(model_path, splits.labels, tokenizer, precision, cfg, device)
    if is_main_process() and "random_head" in cfg.eval.baselines:
        # Before lora.head_init: the reference's untrained classifier has transformers' random head (LoRA starts as a no-op).
        report.phase("baselines", "random_head: the untrained classifier, as the reference recipe reports it")
        baselines["random_head"], _ = evaluate(base, tokenizer, splits.test, splits.labels, cfg)
    start_head(base, tokenizer, splits, cfg, model_path, report)
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)  # QLoRA: fp32 norms, input grads for checkpointing
    model = add_lora(base, cfg.lora)
    trainable, total = parameter_counts(model)
    report(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    baselines = {name: baselines[name] for name in cfg.eval.baselines if name in baselines}  # in the order asked

    trainer = build_trainer(model, tokenizer, splits, cfg, run_dir, precision, device, report)
    return Run(cfg, splits, run_dir, report, checkpoint, device, precision, model_path, tokenizer, model, trainer,
               baselines, trainable, total, truncated)


HEAD_INITS = ("random", "zero", "label_words")
CLASS_WEIGHTS = ("none", "balanced")
PROBE_TEXTS = 64  # training texts that scale the label-words head


def start_head(model, tokenizer, splits: Splits, cfg: Config, model_path: str, report: Reporter) -> None:
    """Initialise the new head as lora.head_init says (before LoRA wraps it: LoRA starts as a no-op)."""
    if cfg.lora.head_init == "label_words":
        words = label_words(splits.labels, cfg.eval.label_descriptions)
        probe = splits.train[:PROBE_TEXTS]
        ids = encode(tokenizer, [ex.text for ex in probe], cfg.data.max_length, cfg.data.prompt_template)
        targets = [splits.labels.index(ex.label) for ex in probe]
        scale = init_head(model, "label_words", tokenizer=tokenizer, words=words, model_path=model_path,
                          revision=cfg.model.revision, probe=(ids, targets))
        report(f"head: each label's row from the output embedding of its words, scaled by {scale:.3g}")
    else:
        init_head(model, cfg.lora.head_init)


def check_settings(cfg: Config) -> None:
    """What would otherwise fail mid-run, after data and model have loaded."""
    t = cfg.train
    if cfg.lora.head_init not in HEAD_INITS:
        raise ValueError(f"lora.head_init must be one of {', '.join(HEAD_INITS)}, got {cfg.lora.head_init!r}")
    if t.class_weights not in CLASS_WEIGHTS:
        raise ValueError(f"train.class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {t.class_weights!r}")
    if not 0 <= t.label_smoothing < 1:
        raise ValueError(f"train.label_smoothing is the share of each target spread over the other labels: in [0, 1), got {t.label_smoothing}")
    if cfg.lora.top_layers is not None and cfg.lora.top_layers < 1:
        raise ValueError(f"lora.top_layers is a number of layers (>= 1) or none (all), got {cfg.lora.top_layers}")
    template = cfg.data.prompt_template
    if template is not None and template.count("{text}") != 1:
        raise ValueError(f"data.prompt_template must contain {{text}} exactly once (where each text goes), got {template!r}")
    if t.min_steps < 0 or (t.max_steps is not None and t.max_steps < 1) or t.linear_probe_steps < 0:
        raise ValueError(f"train.min_steps and train.linear_probe_steps must be >= 0 and train.max_steps >= 1 (or none), "
                         f"got {t.min_steps}, {t.linear_probe_steps} and {t.max_steps}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        raise ValueError(f"train.early_stopping_patience is a number of evaluations (>= 1) or none, got {t.early_stopping_patience}")
    for name in ("head_lr", "loraplus_lr_ratio"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be positive (or none), got {getattr(t, name)}")
    if t.linear_probe_steps and process_count() > 1:
        raise ValueError("train.linear_probe_steps freezes LoRA for a while, which DDP does not allow; set it to 0 for multi-process training")
    if t.save_steps is not None and t.save_steps < 1:
        raise ValueError(f"train.save_steps must be a positive number of steps (or none: every epoch), got {t.save_steps}")
    if not 0 <= t.warmup_ratio < 1:
        raise ValueError(f"train.warmup_ratio is the share of the optimizer steps spent warming up: between 0 and 1, got {t.warmup_ratio}")
    if t.grad_accum < 1 or t.batch_size < 1:
        raise ValueError(f"train.batch_size and train.grad_accum must be at least 1, got {t.batch_size} and {t.grad_accum}")
    resolve_precision(t.precision, training=True)
    if t.precision == "bf16-weights" and cfg.model.load_in_4bit:
        raise ValueError("train.precision bf16-weights reads the base in bf16, which model.load_in_4bit replaces: choose one")
    check_report_to(t.report_to)  # an unknown or uninstalled tracker fails now, not after the baselines
    if cfg.model.load_in_4bit:
        check_4bit_supported()


def training_precision(precision: str, device: torch.device) -> str:
    """What `precision` means here. On CPUs `auto` is timed, and two processes timing at once could choose
    differently: under torchrun rank 0 decides for all. (On GPUs every process gets the same answer.)"""
    decide = functools.partial(resolve_precision, precision, device, training=True)
    return rank_zero_decides(decide) if device.type == "cpu" else decide()


def training_device(device: str) -> torch.device:
    """`auto` under torchrun on GPUs: each process its own GPU (LOCAL_RANK)."""
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return resolve_device(device)


def load_data(cfg: Config, echo=None) -> Splits:
    report, d = as_reporter(echo), cfg.data
    splits = load_splits(
        d.train, d.test, d.valid, d.labels, d.drop_unknown, d.valid_fraction,
        d.max_train_samples, d.max_test_samples, d.text_field, d.label_field, cfg.train.seed,
    )
    if splits.problems:
        report(summarize(splits.problems, "the given labels (data.labels)" if d.labels else "the training file's labels"))
    shown = ", ".join(splits.labels[:12]) + (f", ... ({len(splits.labels)} in all)" if len(splits.labels) > 12 else "")
    report(f"data: {len(splits.train)} train, {len(splits.valid)} valid, {len(splits.test)} test; labels: {shown}")
    if not splits.valid:
        if cfg.train.select_best:
            raise ValueError("train.select_best picks a checkpoint on validation data, and there is none: give --valid")
        why = "data.valid_fraction none" if d.valid_fraction is None else (
            f"every label has fewer than {math.ceil(1 / d.valid_fraction)} training texts, and data.valid_fraction "
            f"{d.valid_fraction:g} never takes more than that share of one")
        report(f"no validation set ({why}): every training text trains; no early stopping, no validation curves")
    if d.valid is None and d.valid_fraction == 0:
        report.warning("data.valid_fraction is 0 and no --valid file: the test set is also the validation set "
                       "(early stopping, and the checkpoint with train.select_best), so the test score is optimistic")
    return splits


def truncated_texts(tokenizer, splits: Splits, cfg: Config, report: Reporter) -> dict[str, int]:
    """How many train and test texts max_length cuts, said out loud: the model never sees their ends."""
    counts = {name: count_truncated(tokenizer, [ex.text for ex in getattr(splits, name)], cfg) for name in ("train", "test")}
    for name, cut in counts.items():
        if cut:
            report.warning(f"{cut} {name} text(s) are longer than data.max_length={cfg.data.max_length} tokens: the model sees only their start")
    return counts


def count_truncated(tokenizer, texts: list[str], cfg: Config) -> int:
    """Texts longer than max_length tokens with the prompt template around them: the model sees only their start."""
    lengths = tokenizer(apply_template(texts, cfg.data.prompt_template), truncation=False)["input_ids"]
    return sum(len(ids) > cfg.data.max_length for ids in lengths)


EAGER_MAX_LENGTH = 256  # eager attention weights, batch 16 x 14 heads in bf16: 29 MB a layer at 256 tokens, 117 MB at 512


def load_base(model_path: str, labels: list[str], tokenizer, precision: str, cfg: Config, device):
    """The classifier to train (and to reload the adapter onto) in the training precision."""
    weights, compute = training_dtypes(precision)
    model = load_classifier(model_path, labels, tokenizer.pad_token_id, compute, cfg.model, device, weights_dtype=weights)
    if precision == "bf16" and device.type == "cpu" and cfg.data.max_length <= EAGER_MAX_LENGTH:
        # PyTorch's CPU SDPA kernel is slow backwards in bf16 (10% of a training step on short texts); eager
        # attention's plain matrix products are not (docs/BENCHMARKS.md, "Attention and casts"). Eager keeps
        # each layer's attention weights, which grow with the square of the length: short texts only.
        model.set_attn_implementation("eager")
    return model


def describe(precision: str) -> str:
    return "bf16 weights computed in fp32" if precision == "bf16-weights" else precision


def evaluate(model, tokenizer, examples: list[Example], labels: list[str], cfg: Config) -> tuple[dict, torch.Tensor]:
    logits = batched_logits(model, tokenizer, [ex.text for ex in examples], batch_size=cfg.train.eval_batch_size, **inference_settings(cfg))
    probs = logits.softmax(-1)
    return metrics_from_probs(examples, probs, labels), probs


def run_lm_baselines(tokenizer, splits: Splits, cfg: Config, model_path: str, precision: str, device, report: Reporter) -> dict:
    """The baselines that need no classifier, before it loads: the zero-shot LM is freed before training starts."""
    results = {}
    for name in cfg.eval.baselines:
        if name == "tfidf":
            report.phase("baselines", "tfidf: character n-gram TF-IDF + logistic regression on the same train split")
            results[name] = tfidf_baseline(splits.train, splits.test, splits.labels)
        elif name == "zero_shot":
            if not tokenizer.chat_template:
                report.warning("baseline zero_shot skipped: the model has no chat template (not an instruct model)")
                continue
            from intentlora.zeroshot import zero_shot_baseline

            report.phase("baselines", f"zero_shot: the instruct model prompted with the {len(splits.labels)} intents, each scored by likelihood")
            weights, compute = training_dtypes(precision)
            lm = load_causal_lm(model_path, compute, cfg.model, device, weights_dtype=weights)
            results[name] = zero_shot_baseline(lm, tokenizer, splits.test, splits.labels, cfg.eval.label_descriptions)
            del lm
            release_memory()
        elif name != "random_head":
            raise ValueError(f"unknown baseline {name!r}; choose from random_head, zero_shot, tfidf")
    return results


def tokenize(tokenizer, examples: list[Example], labels: list[str], cfg: Config) -> Dataset:
    """Token ids only: padding happens per batch in the collator (dynamic padding)."""
    label2id = {label: i for i, label in enumerate(labels)}
    ids = encode(tokenizer, [ex.text for ex in examples], cfg.data.max_length, cfg.data.prompt_template)
    padding = {"padding": "max_length", "max_length": cfg.data.max_length} if cfg.train.pad_to_max_length else {"padding": False}
    enc = tokenizer.pad({"input_ids": ids}, **padding)
    return Dataset.from_dict({
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": [label2id[ex.label] for ex in examples],
        "length": [len(row) for row in enc["input_ids"]],
    })


def planned_steps(cfg: Config, train_size: int) -> int:
    """Optimizer steps: `epochs` passes, at least train.min_steps, at most train.max_steps."""
    t = cfg.train
    steps = math.ceil(math.ceil(train_size / (t.batch_size * t.grad_accum * process_count())) * t.epochs)
    steps = max(steps, t.min_steps)
    return min(steps, t.max_steps) if t.max_steps is not None else steps


def class_weights(examples: list[Example], labels: list[str], mode: str) -> torch.Tensor | None:
    """`balanced`: n / (labels x count), sklearn's rule (a label absent from train gets weight 0); `none`: None."""
    if mode == "none":
        return None
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    present = sorted({ex.label for ex in examples}, key=labels.index)
    weights = dict(zip(present, compute_class_weight("balanced", classes=np.array(present), y=[ex.label for ex in examples])))
    return torch.tensor([float(weights.get(label, 0.0)) for label in labels])


def build_trainer(model, tokenizer, splits: Splits, cfg: Config, run_dir: Path, precision: str, device: torch.device,
                  report: Reporter) -> Trainer:
    t = cfg.train
    # Evaluate whenever a checkpoint is saved: picking the best one needs both on the same schedule.
    schedule = "steps" if t.save_steps else "epoch"
    validating = bool(splits.valid)  # none: valid_fraction none, or every label under 1 / valid_fraction texts
    args = TrainingArguments(
        output_dir=str(checkpoints_dir(run_dir)),
        max_steps=planned_steps(cfg, len(splits.train)),
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the optimizer steps (check_settings keeps it so)
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        bf16=precision == "bf16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (LoRA) as is
        use_cpu=device.type == "cpu",  # accelerate refuses bf16 on CPU otherwise
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy=schedule if validating else "no",
        save_strategy=schedule,
        **({"eval_steps": t.save_steps, "save_steps": t.save_steps} if t.save_steps else {}),
        save_total_limit=2,  # the best and the latest (HF never rotates the best away; at 1 it would drop the latest)
        load_best_model_at_end=t.select_best,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_steps=t.logging_steps,
        report_to=[name for name in t.report_to if name != "none"] or "none",
        run_name=run_dir.name,  # the tracker's run is named as the run folder
        project=TRACKING_PROJECT,  # Trackio's project: finish_run reopens the run by project and name
        # The classification loss is a mean per example, not a token sum: HF's
        # cross-process token averaging would multiply it by the process count.
        average_tokens_across_devices=False,
        disable_tqdm=True,  # the Reporter draws named bars instead
        # A resumed run continues early stopping's patience count, not a fresh one.
        restore_callback_states_from_checkpoint=True,
    )

    def compute_metrics(prediction) -> dict:
        m = classification_metrics(prediction.label_ids.tolist(), prediction.predictions.argmax(-1).tolist(), splits.labels)
        return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]}

    trainer = IntentTrainer(
        class_weights=class_weights(splits.train, splits.labels, t.class_weights),
        label_smoothing=t.label_smoothing,
        head_lr=t.head_lr,
        loraplus_lr_ratio=t.loraplus_lr_ratio,
        model=model,
        args=args,
        train_dataset=tokenize(tokenizer, splits.train, splits.labels, cfg),
        eval_dataset=tokenize(tokenizer, splits.valid, splits.labels, cfg) if validating else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.remove_callback(PrinterCallback)  # raw dicts on the console
    trainer.add_callback(ReporterCallback(report))
    place_logs(trainer.callback_handler.callbacks, run_dir)  # TensorBoard into RUN/tensorboard: checkpoints/ is deleted at the end
    if t.early_stopping_patience is not None and validating:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    if t.linear_probe_steps:
        trainer.add_callback(LinearProbeFirst(t.linear_probe_steps))
    # Our models' forward takes **kwargs, so Trainer would assume the loss is
    # already divided over the accumulated batches, and not divide it: with
    # grad_accum k, gradients and logged loss k times too large. The
    # classification loss is a plain mean per batch: let Trainer divide it.
    trainer.model_accepts_loss_kwargs = False
    return trainer


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of texts of similar length, in random order.

    HF's group_by_length sorts within megabatches of len(data) / 4 texts on
    small sets, which left 23% of the bundled data's batch tokens as padding.
    Sorting within spans of 50 batches (all of a small set), then shuffling
    whole batches, pads a few percent and still varies the batches and their
    order every epoch. The order is a function of (seed, epoch) alone, set by
    HF's `set_epoch` protocol: a run resumed in any epoch replays it, and
    every process under DDP draws the same one.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, span_batches: int = 50):
        self.lengths, self.batch_size, self.span = list(lengths), batch_size, batch_size * span_batches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.span):
            span = sorted(order[start : start + self.span], key=self.lengths.__getitem__)
            batches += [span[i : i + self.batch_size] for i in range(0, len(span), self.batch_size)]
        # A short batch (there is at most one) goes last, so the loader's batch boundaries stay aligned.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in torch.randperm(len(full), generator=generator).tolist():
            yield from full[i]
        for batch in short:
            yield from batch


class EpochToSampler(TrainerCallback):
    """Tell the sampler its epoch at each epoch's start.

    Trainer's own set_epoch call does not reach a sampler wrapped in
    accelerate's shard and skip wrappers (DDP, resume mid-epoch); this does.
    """

    def __init__(self, sampler: LengthBucketSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch + 1e-6))


class LinearProbeFirst(TrainerCallback):
    """LP-FT: LoRA frozen for the first `steps` optimizer steps (the head learns alone), then trained.

    Set before every step, so a run resumed in either phase is in the right one.
    A frozen LoRA weight gets no gradient, and AdamW leaves a weight without
    one untouched (no update, no decay); the backward pass stops at the head.
    """

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        probing = state.global_step < self.steps
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(not probing)


def is_head_parameter(name: str) -> bool:
    """The trained copy of the classification head (PEFT's modules_to_save)."""
    return "modules_to_save" in name


class IntentTrainer(Trainer):
    """HF Trainer with LengthBucketSampler for group_by_length, class-weighted loss, and learning rates per part.

    `head_lr` is the new head's learning rate; `loraplus_lr_ratio` multiplies
    the LoRA B matrices' (LoRA+, Hayou et al. 2024); `class_weights` weights
    the cross-entropy per label, `label_smoothing` softens its targets (torch's
    definition); without either, the model's own loss. The loss stays a mean
    per batch, so Trainer still divides it over accumulated batches
    (model_accepts_loss_kwargs is False, no compute_loss_func).
    """

    def __init__(self, *args, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 head_lr: float | None = None, loraplus_lr_ratio: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights, self.label_smoothing = class_weights, label_smoothing
        self.head_lr, self.loraplus_lr_ratio = head_lr, loraplus_lr_ratio

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weights is None and not self.label_smoothing:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        weight = None if self.class_weights is None else self.class_weights.to(outputs.logits.device)
        loss = torch.nn.functional.cross_entropy(outputs.logits.float(), inputs["labels"], weight=weight,
                                                 label_smoothing=self.label_smoothing)
        return (loss, outputs) if return_outputs else loss

    def parameter_lr(self, name: str) -> float:
        if is_head_parameter(name) and self.head_lr is not None:
            return self.head_lr
        if "lora_B" in name and self.loraplus_lr_ratio is not None:
            return self.args.learning_rate * self.loraplus_lr_ratio
        return self.args.learning_rate

    def create_optimizer(self, model=None):
        """HF's optimizer, with one parameter group per (learning rate, weight decay)."""
        if self.optimizer is not None or (self.head_lr is None and self.loraplus_lr_ratio is None):
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = (self.parameter_lr(name), self.args.weight_decay if name in decay else 0.0)
                groups.setdefault(key, []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
                                       **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = dataset["length"] if "length" in dataset.column_names else [len(ids) for ids in dataset["input_ids"]]
        # Each process's batch: accelerate hands consecutive batches to the processes in turn.
        sampler = LengthBucketSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps, self.args.seed)
        self.add_callback(EpochToSampler(sampler))
        return sampler


class TokenCounter:
    """Counts the real and the padded tokens of training forward passes: padding is compute spent on nothing."""

    def __init__(self):
        self.real = self.padded = self.rows = 0

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:  # not the per-epoch evaluation
            self.real += int(mask.sum())
            self.padded += mask.numel()
            self.rows += mask.shape[0]


# -- fit --------------------------------------------------------------------------


def fit(run: Run) -> Fit:
    t, world_size = run.cfg.train, process_count()
    global_batch = t.batch_size * t.grad_accum * world_size
    steps = planned_steps(run.cfg, len(run.splits.train))
    epochs = steps / math.ceil(len(run.splits.train) / global_batch)
    stopping = f", stopping early after {t.early_stopping_patience} evaluations without progress" if t.early_stopping_patience else ""
    run.report.phase("training", f"{len(run.splits.train)} texts x {epochs:.3g} epochs, {steps} steps{stopping}; "
                                 f"global batch {global_batch} ({t.batch_size} per process x {t.grad_accum} accumulation x {world_size}); lr {t.lr}")
    run.report(f"processes: {world_size}; global batch {global_batch} ({t.batch_size} per process x {t.grad_accum} accumulation x {world_size}); lr {t.lr}")
    tokens = TokenCounter()
    hook = run.model.register_forward_pre_hook(tokens, with_kwargs=True)
    start = time.perf_counter()
    # Under bf16 autocast, PEFT's cast of each adapted layer's input to the adapter's fp32 weights is undone by
    # autocast at once: two copies of every input for the same product. Outside training (no autocast) it is needed.
    try:
        with disable_input_dtype_casting(run.model, active=run.precision == "bf16"):
            run.trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    resumed_step = checkpoint_step(run.checkpoint) if run.checkpoint else 0
    # Throughput counts training alone: the per-epoch evaluations are timed apart.
    evaluating = sum(e.get("eval_runtime", 0.0) for e in run.trainer.state.log_history if e.get("step", 0) > resumed_step)
    return Fit(seconds, evaluating, resumed_step, tokens.real, tokens.padded, tokens.rows,
               classifier_of(run.model).config._attn_implementation)


# -- finalize ---------------------------------------------------------------------


def finalize(run: Run, fitted: Fit) -> RunResult:
    cfg, report = run.cfg, run.report
    report.phase("saving", f"adapter, head and labels to {run.run_dir}")
    adapter_dir = save_adapter(run.trainer.model, run.splits.labels, run.run_dir)
    trained = probe_logits(run.trainer.model, run.tokenizer, run.splits, cfg)
    state, callbacks = run.trainer.state, run.trainer.callback_handler.callbacks
    run.trainer = run.model = None  # the checks load the model again: free the trained one first
    release_memory()

    report.phase("checking", "reloading the saved adapter (logits must match) and merging it layer by layer (float64)")
    base = load_base(run.model_path, run.splits.labels, run.tokenizer, run.precision, cfg, run.device)
    reloaded = load_adapter(base, adapter_dir)
    probe = lambda model: probe_logits(model, run.tokenizer, run.splits, cfg)  # noqa: E731
    parity = verify_saved_adapter(trained, reloaded, probe, reload_tolerance(run.precision, run.device))
    del base, reloaded
    release_memory()

    report.phase("evaluating", f"the saved run on {len(run.splits.test)} test texts, as `predict` loads it ({DEFAULT_PRECISION})")
    start = time.perf_counter()
    classifier = classifier_for_run(run.run_dir, device=run.device, allow_pickle=cfg.model.allow_pickle)
    with report.bar("eval test", len(run.splits.test), unit="text") as bar:
        probs = classifier.probabilities([ex.text for ex in run.splits.test], progress=bar.update)
    eval_seconds = time.perf_counter() - start
    del classifier
    release_memory()
    lora = metrics_from_probs(run.splits.test, probs, run.splits.labels)
    if lora["absent_labels"]:
        report.warning(f"labels neither in the test set nor predicted, left out of macro-F1: {', '.join(lora['absent_labels'])}")

    metrics = assemble_metrics(run, fitted, state, lora, parity, adapter_dir, eval_seconds)
    report.phase("report", "report.md, report.html, plots and errors.jsonl")
    write_report(run.run_dir, metrics, run.splits.test, probs)
    write_card(run.run_dir, metrics, cfg)
    write_metrics(run.run_dir, metrics)  # last: from here on the run is finished
    # After the files it uploads (README.md, metrics.json) exist; it only warns on failure.
    finish_run(callbacks, cfg.train.report_to, dataclasses.asdict(cfg), metrics, run.run_dir)
    if not cfg.output.keep_checkpoints:
        remove_checkpoints(run.run_dir)
    report.phase("done", f"finished: {run.run_dir}")
    report.result(run.run_dir, metrics)
    return RunResult(run.run_dir, metrics)


def write_card(run_dir: Path, metrics: dict, cfg: Config) -> None:
    """The Hub model card (README.md), when the card module is there."""
    try:
        from intentlora.card import write_model_card
    except ImportError:
        return
    write_model_card(run_dir, metrics, dataclasses.asdict(cfg), merged=False)


def save_adapter(model, labels: list[str], run_dir: Path) -> Path:
    with staged_dir(run_dir / ADAPTER_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    write_labels(run_dir, labels)
    return run_dir / ADAPTER_DIR


def probe_logits(model, tokenizer, splits: Splits, cfg: Config) -> torch.Tensor:
    """Logits on the first test texts: what a saved and reloaded adapter must reproduce."""
    probe = [ex.text for ex in splits.test[:PARITY_PROBE]]
    return batched_logits(model, tokenizer, probe, batch_size=cfg.train.eval_batch_size, **inference_settings(cfg))


def reload_tolerance(precision: str, device: torch.device) -> float:
    return (RELOAD_TOLERANCE_CUDA if device.type == "cuda" else RELOAD_TOLERANCE)[precision]


def verify_saved_adapter(trained: torch.Tensor, reloaded, probe, tolerance: float) -> dict:
    """The adapter reloaded from disk onto a fresh base gives the trained model's `probe` logits; merging it changes nothing.

    The reload runs in the training precision on the training device, where it
    must match to within `tolerance`. The merge check (models.check_merge)
    holds one layer at a time in float64, not a float64 copy of the model.
    """
    reload_diff = (probe(reloaded) - trained).abs().max().item()
    merge = check_merge(reloaded)
    parity = {
        "reload_max_abs_diff": reload_diff,
        "tolerance": tolerance,
        "merge_max_abs_diff": merge["max_abs_diff"],
        "merge_max_rel_diff": merge["max_rel_diff"],
        "merge_tolerance": MERGE_TOLERANCE,
        "merge_layers": merge["layers"],
        "probe_texts": len(trained),
    }
    if reload_diff > tolerance or merge["max_rel_diff"] > MERGE_TOLERANCE:
        raise ParityError(f"saved adapter does not reproduce the trained model: {parity}")
    return parity


def assemble_metrics(run: Run, fitted: Fit, state, lora: dict, parity: dict, adapter_dir: Path, eval_seconds: float) -> dict:
    cfg, t, world_size = run.cfg, run.cfg.train, process_count()
    training = max(fitted.seconds - fitted.evaluating, 1e-9)
    weights = class_weights(run.splits.train, run.splits.labels, t.class_weights)
    lora = {**lora, "precision": resolve_precision(DEFAULT_PRECISION, run.device)}
    return {
        "labels": run.splits.labels,
        "model": cfg.model.name,
        "baselines": run.baselines,
        "lora": lora,
        "train": {
            "seconds": round(fitted.seconds, 2),
            "eval_during_training_s": round(fitted.evaluating, 2),
            "samples_per_s": round(fitted.rows * world_size / training, 3),  # texts trained on in this process's share
            # Counted on rank 0; the other processes see as many batches.
            "real_tokens_per_s": round(fitted.real_tokens * world_size / training, 1),
            "padded_tokens_per_s": round(fitted.padded_tokens * world_size / training, 1),
            "padding_share": round(1 - fitted.real_tokens / max(fitted.padded_tokens, 1), 4),
            "eval_seconds": round(eval_seconds, 2),
            "eval_samples_per_s": round(len(run.splits.test) / eval_seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "precision": run.precision,
            "attention": fitted.attention,
            "device": str(run.device),
            "epochs": round(state.epoch or 0.0, 3),  # as trained: min_steps, max_steps and early stopping decide
            "max_steps": state.max_steps,
            "stopped_early": state.global_step < state.max_steps,
            "lr": t.lr,
            "head_lr": t.head_lr if t.head_lr is not None else t.lr,
            "head_init": cfg.lora.head_init,
            "class_weights": dict(zip(run.splits.labels, weights.tolist())) if weights is not None else None,
            "label_smoothing": t.label_smoothing,
            "processes": world_size,
            "global_batch_size": t.batch_size * t.grad_accum * world_size,
            "steps": state.global_step,
            "resumed_from_step": fitted.resumed_step or None,
            "best_checkpoint": state.best_model_checkpoint,
            "selected": "best" if t.select_best else "last",
            "trainable_params": run.trainable,
            "total_params": run.total,
            "trainable_percent": round(100 * run.trainable / run.total, 4),
            "adapter_size_mb": round(dir_size_mb(adapter_dir), 3),
            "log_history": state.log_history,
        },
        "parity": parity,
        "data": {
            "train": len(run.splits.train), "valid": len(run.splits.valid), "test": len(run.splits.test),
            "valid_is_test": cfg.data.valid is None and cfg.data.valid_fraction == 0,
            "truncated": run.truncated,
            "max_length": cfg.data.max_length,
            "warnings": [str(p) for p in run.splits.problems if p.severity != "error"],
        },
    }


def release_memory() -> None:
    """Free a model that is no longer used, and hand the freed heap back to the OS (glibc keeps it otherwise),
    so the next phase's model does not stack on the last one's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, just not returned
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
