import hashlib
from pathlib import Path

import pytest
import yaml

from intentlora import offline
from intentlora.offline import OfflineModel, OfflineModelError, _assemble, resolve_gguf_file, resolve_offline

YAML_INIT = Path(yaml.__file__)


def test_assemble_joins_chunks_in_order_and_checks_sha256(tmp_path):
    data = YAML_INIT.read_bytes()
    good = OfflineModel("pip install pyyaml", (("yaml", "__init__.py"), ("yaml", "__init__.py")), hashlib.sha256(data * 2).hexdigest())
    _assemble("x", good, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == data * 2

    bad = OfflineModel("pip install pyyaml", good.chunks, "0" * 64)
    with pytest.raises(OfflineModelError, match="sha256"):
        _assemble("x", bad, tmp_path / "y.gguf")


def test_a_missing_package_says_what_to_install(tmp_path):
    model = OfflineModel("pip install some-parts==1.0", (("no_such_package_here", "data/part01.bin"),), "0" * 64)
    with pytest.raises(OfflineModelError, match="pip install some-parts==1.0"):
        _assemble("x", model, tmp_path / "x.gguf")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(OfflineModelError, match="pypi:qwen2.5-coder-0.5b-instruct"):
        resolve_offline("pypi:gpt-17")


def test_a_converted_model_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("INTENTLORA_CACHE", str(tmp_path))
    target = tmp_path / "models" / "qwen2.5-coder-0.5b-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(offline, "_assemble", lambda *a: pytest.fail("must not rebuild a cached model"))
    assert resolve_offline("pypi:qwen2.5-coder-0.5b-instruct") == target


def test_user_gguf_files_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("INTENTLORA_CACHE", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr(offline, "convert_gguf", lambda gguf, target, notify=None: seen.append(target) or target)
    a, b = tmp_path / "m.gguf", tmp_path / "other" / "m.gguf"
    b.parent.mkdir()
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert resolve_gguf_file(a) != resolve_gguf_file(b)
    assert resolve_gguf_file(a) == seen[0] and seen[0].parent == tmp_path / "cache" / "gguf"


def test_a_cached_model_loads_in_bf16_from_a_bf16_copy_with_the_same_weights(tiny_qwen2, tmp_path, monkeypatch):
    """The copy saves memory, not precision: its weights equal a bf16 load of the fp32 folder; user folders are left alone."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from intentlora.offline import cached_in_dtype

    monkeypatch.setenv("INTENTLORA_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "tiny"
    shutil.copytree(tiny_qwen2, cached)
    assert cached_in_dtype(str(cached), torch.float32) == str(cached)
    assert cached_in_dtype(str(tiny_qwen2), torch.bfloat16) == str(tiny_qwen2)  # not ours to copy
    copy = cached_in_dtype(str(cached), torch.bfloat16)
    assert copy == str(cached) + ".bf16" and cached_in_dtype(str(cached), torch.bfloat16) == copy  # made once
    from_copy = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16).state_dict()
    cast = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.bfloat16).state_dict()
    assert from_copy.keys() == cast.keys() and all(torch.equal(from_copy[k], cast[k]) for k in cast)
    from safetensors import safe_open

    with safe_open(f"{copy}/model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
