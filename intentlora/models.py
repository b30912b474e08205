"""Resolve a model spec, load it as a classifier, add LoRA, reload and merge.

The places users get burnt live here: a pad token (else batches > 1 fail on
decoder models), the `score` head saved with the adapter, safetensors only,
and `trust_remote_code` off unless asked.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from intentlora.config import LoraConfig, ModelConfig
from intentlora.files import staged_dir
from intentlora.inference import autocast_for, resolve_device
from intentlora.offline import PREFIX as PYPI_PREFIX
from intentlora.offline import cached_in_dtype, resolve_gguf_file, resolve_offline
from intentlora.rundir import (
    ADAPTER_DIR,
    CALIBRATION_FILE,
    check_run_dir,
    inference_settings,
    read_config,
    read_labels,
    read_metrics,
    write_inference_settings,
    write_labels,
)

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


class PickleWeightsError(ValueError):
    """A model folder whose weights are pickle files only: unpickling can run code hidden in them."""


class QuantizationError(ValueError):
    """4-bit loading was asked for where bitsandbytes cannot run it."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_path(spec: str, revision: str | None = None, notify=None) -> str:
    """A hub id stays a hub id; everything else becomes a local folder.

    `notify(line)` hears about slow one-time work (converting a GGUF into the cache)."""
    if spec.startswith(PYPI_PREFIX):
        return str(resolve_offline(spec, notify))
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
        return str(resolve_gguf_file(path, notify))
    if path.exists():
        return str(path)
    return spec


def check_safetensors(path: str, allow_pickle: bool = False) -> None:
    """Refuse a local folder whose weights are pickle files only, unless `allow_pickle`.

    transformers would refuse too (we ask for safetensors), but with a message
    that does not say why or what to do.
    """
    folder = Path(path)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleWeightsError(
            f"{path}: the weights are pickle files only ({', '.join(pickles)}), and loading pickle can run code hidden in it; "
            "intentlora loads safetensors only. Convert them to safetensors where you trust them, or pass --allow-pickle "
            "(config model.allow_pickle: true) if you trust where they come from"
        )


def weights_format(path: str, allow_pickle: bool) -> dict:
    """from_pretrained arguments: safetensors only, or (allowed) safetensors first, then pickle."""
    check_safetensors(path, allow_pickle)
    return {"use_safetensors": None if allow_pickle else True}


def check_4bit_supported() -> None:
    """Say at the start, before data and model load, that --load-in-4bit cannot run here."""
    if not torch.cuda.is_available():
        raise QuantizationError("--load-in-4bit (model.load_in_4bit) needs a CUDA GPU: bitsandbytes 4-bit runs on CUDA only; drop it to train in bf16 or fp32")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError("--load-in-4bit (model.load_in_4bit) needs bitsandbytes: pip install bitsandbytes")


def quantization(load_in_4bit: bool) -> dict:
    """from_pretrained arguments for QLoRA's frozen base: 4-bit NF4 weights, bf16 compute, on the current GPU."""
    if not load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


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
    options: ModelConfig | None = None,
    device: str | torch.device | None = "cpu",
    weights_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """The base model with a new classification head for `labels`."""
    model = load_pretrained(
        AutoModelForSequenceClassification, path, dtype, options, device, weights_dtype=weights_dtype,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model.config.pad_token_id = pad_token_id
    return keep_head_fp32(model)


def load_causal_lm(
    path: str, dtype: torch.dtype = torch.float32, options: ModelConfig | None = None, device: str | torch.device | None = "cpu",
    weights_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """The base model with its language-model head, for zero-shot prompting."""
    return load_pretrained(AutoModelForCausalLM, path, dtype, options, device, weights_dtype=weights_dtype)


def load_pretrained(auto_class, path: str, dtype: torch.dtype, options: ModelConfig | None, device,
                    weights_dtype: torch.dtype | None = None, **extra) -> PreTrainedModel:
    """The one place model weights are read: safetensors only unless allowed, remote code only when asked,
    4-bit only on CUDA, and on `device` ("auto": the GPU when there is one). The weights are read in
    `weights_dtype` (default: `dtype`) and computed in `dtype`: bf16 weights in fp32 is training's bf16-weights."""
    options = options or ModelConfig()
    weights_dtype = weights_dtype or dtype
    path = cached_in_dtype(path, weights_dtype)  # a cached fp32 model loads as bf16 from its bf16 copy: a third of the memory
    model = auto_class.from_pretrained(
        path, dtype=weights_dtype, trust_remote_code=options.trust_remote_code, revision=options.revision,
        **weights_format(path, options.allow_pickle), **quantization(options.load_in_4bit), **extra,
    )
    if not options.load_in_4bit:  # bitsandbytes placed it already
        model.to(resolve_device(device))
    if weights_dtype != dtype:
        model.to(dtype)
    return model


def keep_head_fp32(model: PreTrainedModel) -> PreTrainedModel:
    """On a half-precision base the head stays fp32: the new head is trained in
    full, and fp32 keeps its values exact through save, reload and merge."""
    if next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        for name in HEAD_NAMES:
            if isinstance(getattr(model, name, None), torch.nn.Module):
                getattr(model, name).float()
    return model


def head_layer(model: PreTrainedModel) -> torch.nn.Linear:
    """The output layer of the classification head (`score` on decoders, `classifier` on encoders)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return output_layer(getattr(model, name))
    raise ValueError(f"{type(model).__name__}: no classification head named {' or '.join(HEAD_NAMES)}")


def label_words(labels: list[str], descriptions: dict[str, str] | None = None) -> list[str]:
    """Each label's words: its description when given, else its name with _ and - as spaces (card_lost -> card lost)."""
    descriptions = descriptions or {}
    return [descriptions.get(label) or label.replace("_", " ").replace("-", " ").strip() for label in labels]


def output_embeddings(model: PreTrainedModel, model_path: str, revision: str | None = None) -> torch.Tensor:
    """The language-model head's weights (vocab x hidden), which a ...ForSequenceClassification model does not load.

    Tied models (Qwen2.5 0.5B-3B, ...) share them with the input embeddings;
    otherwise `lm_head.weight` is read from the checkpoint's safetensors."""
    if getattr(model.config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight.detach()
    from safetensors import safe_open

    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            if "lm_head.weight" in weights.keys():
                return weights.get_tensor("lm_head.weight")
    raise ValueError(f"{model_path}: no lm_head.weight in its safetensors, so lora.head_init=label_words has no output "
                     "embeddings to start from (encoder models have none); use head_init zero")


def label_word_rows(model: PreTrainedModel, tokenizer, words: list[str], model_path: str, revision: str | None = None) -> torch.Tensor:
    """One row per label: the mean output embedding of its words' tokens, as the model would write them next (" word")."""
    embeddings = output_embeddings(model, model_path, revision).float()
    rows = []
    for text in words:
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label words {text!r} tokenize to nothing")
        rows.append(embeddings[ids].mean(0))
    return torch.stack(rows)


def init_head(model: PreTrainedModel, mode: str, *, tokenizer=None, words: list[str] | None = None, model_path: str | None = None,
              revision: str | None = None, probe: tuple[list[list[int]], list[int]] | None = None) -> float:
    """Start the new head as `mode` says; returns the label-words scale (1.0 otherwise).

    random: transformers' init. On Qwen's large-norm last hidden state its
    logits are large, so step 0 costs far more than ln(labels).
    zero: every logit 0, step 0 costs exactly ln(labels).
    label_words: row i = s x the output embedding of label i's words, so the
    head scores each label as the LM would score its words as the next token
    (a zero-shot start, LM-BFF style). s is the temperature that minimises the
    cross-entropy on `probe` (token ids, label ids): s = 0 is the zero head, so
    step 0 costs at most ln(labels).
    """
    layer = head_layer(model)
    if mode == "random":
        return 1.0
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.zero_()
        if mode == "zero":
            layer.weight.zero_()
            return 1.0
        if mode != "label_words":
            raise ValueError(f"lora.head_init must be random, zero or label_words, got {mode!r}")
        rows = label_word_rows(model, tokenizer, words, model_path, revision)
        layer.weight.copy_(rows.to(layer.weight.dtype))
        ids, targets = probe
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(layer.weight.device)
        model.eval()
        with autocast_for(model):
            logits = model(**batch).logits.float().cpu()
        scale = best_temperature(logits, torch.tensor(targets))
        layer.weight.mul_(scale)
    return scale


def best_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The s in [0, 100] minimising cross-entropy(s x logits): a grid in log space, 0 included."""
    candidates = [0.0] + torch.logspace(-4, 2, 121).tolist()
    losses = [torch.nn.functional.cross_entropy(s * logits, targets).item() for s in candidates]
    return candidates[min(range(len(candidates)), key=losses.__getitem__)]


def target_modules_for(model: PreTrainedModel, override: list[str] | None = None, top_layers: int | None = None) -> list[str] | str:
    """The override, else per architecture; ["all-linear"] is PEFT's every-linear-layer shortcut, spelled out
    as module names when only the top layers are adapted (PEFT takes layers_to_transform with names only)."""
    if override == ["all-linear"]:
        return "all-linear" if top_layers is None else linear_module_names(model)
    return override or TARGET_MODULES.get(model.config.model_type, DEFAULT_TARGET_MODULES)


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """The last name of every linear layer inside the numbered transformer layers: what "all-linear" adapts."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)}
    return sorted(names)


def top_layer_indices(model: PreTrainedModel, top_layers: int | None) -> list[int] | None:
    """The indices of the last `top_layers` transformer layers (None: every layer)."""
    if top_layers is None:
        return None
    count = model.config.num_hidden_layers
    if not 1 <= top_layers <= count:
        raise ValueError(f"lora.top_layers must be between 1 and the model's {count} layers, got {top_layers}")
    return list(range(count - top_layers, count))


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap with LoRA; the classification head is fully trained and saved with it."""
    peft_config = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the `score`/`classifier` head in modules_to_save
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules_for(model, cfg.target_modules, cfg.top_layers),
        layers_to_transform=top_layer_indices(model, cfg.top_layers),
    )
    peft_model = get_peft_model(model, peft_config)
    # Trainable weights stay fp32 even on a bf16 base: bf16 updates of a small
    # learning rate round to zero.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if next(peft_model.parameters()).device.type == "cpu":
        use_cpu_dropout(peft_model)
    return peft_model


def use_cpu_dropout(model: torch.nn.Module) -> None:
    """Swap LoRA's nn.Dropout modules for CpuDropout (same p, same scaling).

    On a CPU, nn.Dropout draws one random float per element: on the 0.5B with
    LoRA on every linear layer that was a fifth of a training step."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if isinstance(dropout, torch.nn.Dropout) and 0 < dropout.p < 1:
                    module.lora_dropout[name] = CpuDropout(dropout.p)


class CpuDropout(torch.nn.Module):
    """Dropout whose mask costs 16 random bits per element instead of a random float.

    One int64 `random_()` gives four 16-bit words (the top one with 15 random
    bits, so 15 of each are used): an element is dropped when its word is below
    round(p * 2**15), a drop rate within 2**-16 of p, and the kept ones are
    scaled by 1 / (1 - that rate) so the expectation is exact. The mask is kept
    as bools for the backward pass, as nn.Dropout does."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**15)
        self.scale = 1.0 / (1.0 - self.threshold / 2**15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
        keep = words.bitwise_and_(0x7FFF).ge(self.threshold).view(x.shape)
        return MaskedScale.apply(x, keep, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the bool mask for the backward pass."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def load_adapter(base: PreTrainedModel, adapter_dir: str | Path, adapter_name: str = "default") -> PeftModel:
    return PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)


def add_adapter(model: PeftModel, adapter_dir: str | Path, adapter_name: str, num_labels: int) -> None:
    """Load one more adapter onto the same base, with its own classification head.

    PEFT gives every adapter a copy of the base head (`modules_to_save`), so a
    head with another number of labels would not load; a copy of the right
    shape is put in place first, and PEFT loads the trained weights into it.
    """
    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and output_layer(wrapper.original_module).out_features != num_labels:
            wrapper.modules_to_save[adapter_name] = head_with_outputs(wrapper.original_module, num_labels)
    model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)


def output_layer(head: torch.nn.Module) -> torch.nn.Linear:
    """The last linear layer of a classification head (the head itself for Qwen2's `score`)."""
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]


def head_with_outputs(head: torch.nn.Module, num_labels: int) -> torch.nn.Module:
    """A copy of `head` whose output layer has `num_labels` outputs (weights to be loaded)."""
    head = copy.deepcopy(head)
    old = output_layer(head)
    new = torch.nn.Linear(old.in_features, num_labels, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    if old is head:
        return new
    parent_name, _, child_name = next(name for name, m in head.named_modules() if m is old).rpartition(".")
    setattr(head.get_submodule(parent_name), child_name, new)
    return head


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), as PEFT's print_trainable_parameters counts them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def load_run(
    run_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    base: str | None = None,
    adapter_name: str = "default",
    allow_pickle: bool = False,
    device: str | torch.device | None = "cpu",
    check_finished: bool = True,
):
    """(model with adapter, tokenizer, labels) from a run directory written by `train`.

    `base` replaces the run's base model spec (e.g. a local copy of a hub model).
    Pickle weights need `allow_pickle` here, whatever the run's config says:
    a run directory may come from someone else. `check_finished` False lets
    `train` load its own run before metrics.json exists.
    """
    run_dir = Path(run_dir)
    if check_finished:
        check_run_dir(run_dir)
    cfg = read_config(run_dir)
    if cfg.model.trust_remote_code:
        log.warning("%s: trust_remote_code is on in this run's config: code from the model repository will run", run_dir)
    labels = read_labels(run_dir)
    options = dataclasses.replace(cfg.model, allow_pickle=allow_pickle, load_in_4bit=False)
    path = resolve_model_path(base or cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.revision)
    model = load_classifier(path, labels, tokenizer.pad_token_id, dtype, options, device)
    return load_adapter(model, run_dir / ADAPTER_DIR, adapter_name), tokenizer, labels


def merge_run(run_dir: str | Path, out_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Write base + adapter as one fp32 model folder that plain transformers loads (`export`, `merge`).

    The folder also keeps what predictions depend on: the labels (config
    id2label, labels.json), how the run turned texts into inputs
    (intentlora.json: truncation length, padding) and the run's
    calibration.json, if any.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, tokenizer, labels = load_run(run_dir, torch.float32, allow_pickle=allow_pickle)
    merged = model.merge_and_unload()
    settings = inference_settings(read_config(run_dir))
    tokenizer.model_max_length = settings["max_length"]
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_labels(tmp, labels)
        write_inference_settings(tmp, settings)
        if (run_dir / CALIBRATION_FILE).is_file():
            shutil.copyfile(run_dir / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
    # The model card, once the folder has its final name (the card is titled by it).
    from intentlora.card import write_model_card

    write_model_card(out_dir, read_metrics(run_dir), dataclasses.asdict(read_config(run_dir)), merged=True)
    return out_dir


def check_merge(model: PeftModel, inputs: int = 4, seed: int = 0) -> dict:
    """Merge every LoRA layer alone, in float64, and compare its outputs before and after.

    A merged layer must compute what the adapter computes: base(x) + B(A(x)) x
    scaling. One layer at a time, so the check costs the memory of the largest
    layer, not of a float64 copy of the model; float64, so rounding (~1e-12
    relative) cannot hide a wrong merge (a wrong scale, a missed or transposed
    update: off by the size of the update itself). Returns the worst absolute
    and relative differences.
    """
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    layers = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), torch.nn.Linear):
            continue
        layer = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        x = torch.randn(inputs, layer.get_base_layer().in_features, dtype=torch.float64, generator=generator)
        with torch.no_grad():
            before = layer(x)
            layer.merge(safe_merge=True)
            after = layer.get_base_layer()(x)
        diff = (after - before).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(before.abs().max().item(), 1e-30))
        layers += 1
        del layer
    return {"layers": layers, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def load_merged_classifier(
    path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None, allow_pickle: bool = False,
    device: str | torch.device | None = "cpu",
):
    """(model, tokenizer, labels) for a folder that already holds a classifier, else None.

    `dtype` None keeps the dtype the folder was saved in.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return None
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=dtype or "auto", **weights_format(path, allow_pickle)
    ).to(resolve_device(device))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return keep_head_fp32(model), tokenizer, [model.config.id2label[i] for i in range(model.config.num_labels)]
