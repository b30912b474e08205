"""Resolve a model spec, load it as a classifier, add LoRA, reload and merge.

The places users get burnt live here: a pad token (else batches > 1 fail on
decoder models), the `score` head saved with the adapter, safetensors only,
and `trust_remote_code` off unless asked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from intentlora.config import LoraConfig, load_config
from intentlora.offline import PREFIX as PYPI_PREFIX
from intentlora.offline import resolve_gguf_file, resolve_offline

log = logging.getLogger(__name__)

MODELSCOPE_PREFIX = "modelscope:"

# LoRA targets by architecture: attention query/value, as the reference does.
TARGET_MODULES = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
}
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]  # Qwen2, Llama, Mistral, Gemma, ...
HEAD_NAMES = ("score", "classifier")  # what PEFT's SEQ_CLS task saves with the adapter


def resolve_model_path(spec: str, revision: str | None = None) -> str:
    """A hub id stays a hub id; everything else becomes a local folder."""
    if spec.startswith(PYPI_PREFIX):
        return str(resolve_offline(spec))
    if spec.startswith(MODELSCOPE_PREFIX):
        try:
            from modelscope import snapshot_download
        except ImportError as err:
            raise RuntimeError(f"{spec}: pip install modelscope to load models from ModelScope") from err
        return snapshot_download(spec.removeprefix(MODELSCOPE_PREFIX), revision=revision)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: GGUF file not found")
        return str(resolve_gguf_file(path))
    if path.exists():
        return str(path)
    return spec


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision(precision)]


def resolve_precision(precision: str) -> str:
    """`auto` is bf16 where the hardware computes it natively, else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        # Decoder models often ship without one; the classifier needs it to find
        # the last real token of each padded row.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"{path}: tokenizer has no pad, eos or unk token to pad with")
    return tokenizer


def load_classifier(
    path: str,
    labels: list[str],
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """The base model with a new classification head for `labels`."""
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        revision=revision,
        use_safetensors=True,
    )
    model.config.pad_token_id = pad_token_id
    # The new head is trained in full: keep it fp32 on a bf16 base, so the
    # trained values survive save, reload and merge exactly.
    if dtype in (torch.bfloat16, torch.float16):
        for name in HEAD_NAMES:
            if isinstance(getattr(model, name, None), torch.nn.Module):
                getattr(model, name).float()
    return model


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedModel:
    """The base model with its language-model head, for zero-shot prompting."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision, use_safetensors=True
    )


def target_modules_for(model: PreTrainedModel, override: list[str] | None = None) -> list[str] | str:
    """The override, else per architecture; ["all-linear"] is PEFT's every-linear-layer shortcut."""
    if override == ["all-linear"]:
        return "all-linear"
    return override or TARGET_MODULES.get(model.config.model_type, DEFAULT_TARGET_MODULES)


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap with LoRA; the classification head is fully trained and saved with it."""
    peft_config = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the `score`/`classifier` head in modules_to_save
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules_for(model, cfg.target_modules),
    )
    peft_model = get_peft_model(model, peft_config)
    # Trainable weights stay fp32 even on a bf16 base: bf16 updates of a small
    # learning rate round to zero.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def load_adapter(base: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), as PEFT's print_trainable_parameters counts them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32, base: str | None = None):
    """(model with adapter, tokenizer, labels) from a run directory written by `train`.

    `base` replaces the run's base model spec (e.g. a local copy of a hub model).
    """
    run_dir = Path(run_dir)
    for required in ("config.yaml", "labels.json", "adapter/adapter_config.json"):
        if not (run_dir / required).is_file():
            raise FileNotFoundError(f"{run_dir}: not a complete run directory (missing {required})")
    cfg = load_config(run_dir / "config.yaml")
    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    path = resolve_model_path(base or cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.revision)
    base = load_classifier(path, labels, tokenizer.pad_token_id, dtype, cfg.model.trust_remote_code, cfg.model.revision)
    return load_adapter(base, run_dir / "adapter"), tokenizer, labels


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter as one fp32 model folder that plain transformers loads."""
    model, tokenizer, _ = load_run(run_dir, torch.float32)
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_merged_classifier(path: str, trust_remote_code: bool = False):
    """(model, tokenizer, labels) for a folder that already holds a classifier, else None."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return None
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, [model.config.id2label[i] for i in range(model.config.num_labels)]
