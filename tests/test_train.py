import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from intentlora.models import load_classifier, load_tokenizer, merge_run
from intentlora.inference import batched_logits
from intentlora.train import ParityError, load_data, probe_logits, train, verify_saved_adapter
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def qwen_run(tiny_qwen2, tmp_path_factory, bundled_rows):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("qwen-run")
    train_file = write_jsonl(tmp / "train.jsonl", bundled_rows["train"][:60])
    test_file = write_jsonl(tmp / "test.jsonl", bundled_rows["test"][:25])
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp / "run")
    return cfg, train(cfg, echo=lambda _: None)


def test_run_directory_holds_everything_promised(qwen_run):
    cfg, result = qwen_run
    run = result.run_dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "labels.json", "config.yaml", "metrics.json", "report.md", "report.html", "errors.jsonl"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["labels"] == json.loads((run / "labels.json").read_text()) == ["balance", "card_lost", "fraud_risk", "other", "refund"]
    for section in (metrics["baselines"]["random_head"], metrics["lora"]):
        assert 0 <= section["macro_f1"] <= 1 and 0 <= section["accuracy"] <= 1
        assert set(section["per_class"]) == set(metrics["labels"])
    assert metrics["train"]["seconds"] > 0 and metrics["train"]["samples_per_s"] > 0 and metrics["train"]["peak_rss_mb"] > 0
    assert 0 < metrics["train"]["trainable_params"] < metrics["train"]["total_params"]
    assert 0 < metrics["train"]["real_tokens_per_s"] <= metrics["train"]["padded_tokens_per_s"]
    assert metrics["train"]["eval_samples_per_s"] > 0
    assert metrics["parity"]["reload_max_abs_diff"] < 1e-4 and metrics["parity"]["merge_max_abs_diff"] < 1e-4
    assert "Baselines vs LoRA" in (run / "report.md").read_text()


def test_adapter_is_plain_peft_and_holds_the_head(qwen_run, tiny_qwen2):
    cfg, result = qwen_run
    weights = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in weights) and any("lora_A" in k for k in weights)
    labels = result.metrics["labels"]
    tokenizer = load_tokenizer(str(tiny_qwen2))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2, num_labels=len(labels))
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter")
    splits = load_data(cfg)
    logits = batched_logits(model, tokenizer, [ex.text for ex in splits.test])
    assert logits.shape == (len(splits.test), len(labels))


def test_training_learns_something(qwen_run):
    _, result = qwen_run
    history = [h["loss"] for h in result.metrics["train"]["log_history"] if "loss" in h]
    assert history[-1] < history[0]


def test_merged_model_loads_with_plain_transformers(qwen_run, tmp_path):
    cfg, result = qwen_run
    out = merge_run(result.run_dir, tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label[0] == "balance" and model.config.label2id["refund"] == 4
    assert model.config.pad_token_id is not None
    tokenizer = load_tokenizer(str(out))
    splits = load_data(cfg)
    texts = [ex.text for ex in splits.test[:8]]
    from intentlora.models import load_run

    adapter_model, _, _ = load_run(result.run_dir)
    torch.testing.assert_close(batched_logits(model, tokenizer, texts), batched_logits(adapter_model, tokenizer, texts), atol=1e-4, rtol=0)


def test_a_corrupted_adapter_fails_parity(qwen_run, tiny_qwen2, tmp_path):
    cfg, result = qwen_run
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(result.run_dir / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "score" in k)
    weights[key] = weights[key] + 0.5
    save_file(weights, adapter / "adapter_model.safetensors")
    splits = load_data(cfg)
    tokenizer = load_tokenizer(str(tiny_qwen2))
    trained = PeftModel.from_pretrained(load_classifier(str(tiny_qwen2), splits.labels, tokenizer.pad_token_id), result.run_dir / "adapter")
    probe = lambda model: probe_logits(model, tokenizer, splits, cfg)  # noqa: E731
    reloaded = PeftModel.from_pretrained(load_classifier(str(tiny_qwen2), splits.labels, tokenizer.pad_token_id), adapter)
    with pytest.raises(ParityError, match="reload_max_abs_diff"):
        verify_saved_adapter(probe(trained), reloaded, probe, 1e-4)
    assert verify_saved_adapter(probe(trained), trained, probe, 1e-4)["merge_layers"] > 0


def test_a_wrong_merge_fails_the_layer_by_layer_check(qwen_run, tiny_qwen2, monkeypatch):
    """check_merge must catch a merge that adds the wrong update, as the float64 whole-model check did."""
    from peft.tuners.lora.layer import Linear

    from intentlora.models import check_merge

    cfg, result = qwen_run
    splits = load_data(cfg)
    tokenizer = load_tokenizer(str(tiny_qwen2))
    model = PeftModel.from_pretrained(load_classifier(str(tiny_qwen2), splits.labels, tokenizer.pad_token_id), result.run_dir / "adapter")
    right = check_merge(model)
    assert right["layers"] == 2 * 7 and right["max_rel_diff"] < 1e-12  # 2 layers x all 7 linear modules (the default)
    delta = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 1.01 * delta(self, adapter))  # a 1% wrong scale
    wrong = check_merge(model)
    assert wrong["max_rel_diff"] > 1e-6


def test_bf16_weights_trains_on_the_rounded_base_and_its_adapter_reloads_exactly(tiny_qwen2, small_data, tmp_path, monkeypatch):
    """The reload check loads the base the way training did: an exact (fp32) match on bf16-rounded weights."""
    import intentlora.models as models

    read_in = []
    real = models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda *a, **kw: read_in.append(kw.get("weights_dtype")) or real(*a, **kw))
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{"train.precision": "bf16-weights", "train.epochs": 1})
    result = train(cfg, echo=lambda _: None)
    assert result.metrics["train"]["precision"] == "bf16-weights"
    assert read_in == [torch.bfloat16, torch.bfloat16, None]  # training, the reload check; the final evaluation as predict loads
    assert result.metrics["parity"]["reload_max_abs_diff"] < 1e-5


@pytest.mark.parametrize(("precision", "max_length", "attention", "uncast"),
                         [("bf16", 128, "eager", True), ("bf16", 512, "sdpa", True), ("fp32", 128, "sdpa", False)])
def test_bf16_on_a_cpu_trains_with_eager_attention_and_uncast_lora_inputs(precision, max_length, attention, uncast, tiny_qwen2,
                                                                          small_data, tmp_path, monkeypatch):
    """bf16 on a CPU: eager attention for the trained model and its reload check (up to 256 tokens: its attention
    weights grow with the square of the length), and PEFT's input casts off while autocast trains (back on after:
    the final evaluation runs without autocast). fp32 keeps SDPA and the casts."""
    import intentlora.train as training

    loaded, casting = [], []
    real_load, real_casting = training.load_base, training.disable_input_dtype_casting
    monkeypatch.setattr(training, "load_base", lambda *a: loaded.append(real_load(*a)) or loaded[-1])
    monkeypatch.setattr(training, "disable_input_dtype_casting",
                        lambda model, active: casting.append(active) or real_casting(model, active=active))
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{"train.precision": precision, "train.epochs": 1,
                                                                              "data.max_length": max_length})
    result = train(cfg, echo=lambda _: None)
    assert [model.config._attn_implementation for model in loaded] == [attention, attention]  # training, reload check
    assert casting == [uncast] and result.metrics["train"]["attention"] == attention
    lora_layers = [m for m in loaded[0].modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and all(m.cast_input_dtype_enabled for m in lora_layers)  # restored for inference
    assert result.metrics["parity"]["reload_max_abs_diff"] < 1e-4


def test_lora_input_casts_change_nothing_under_bf16_autocast(tiny_qwen2):
    """Why they can go: autocast runs the adapter's product in bf16 whatever PEFT cast its input to, so the
    logits and every gradient are the same bit for bit without the two copies."""
    from peft.helpers import disable_input_dtype_casting

    from intentlora.config import LoraConfig
    from intentlora.models import add_lora

    tokenizer = load_tokenizer(str(tiny_qwen2))
    model = add_lora(load_classifier(str(tiny_qwen2), ["a", "b", "c"], tokenizer.pad_token_id, torch.bfloat16),
                     LoraConfig(dropout=0.0, head_init="random"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # LoRA starts as a no-op: make its path count
    batch = tokenizer(["my card is lost", "refund please, the item never came"], padding=True, return_tensors="pt")

    def logits_and_grads(cast: bool):
        model.zero_grad()
        with disable_input_dtype_casting(model, active=not cast), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch).logits
        logits.float().pow(2).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (cast_logits, cast_grads), (uncast_logits, uncast_grads) = logits_and_grads(True), logits_and_grads(False)
    assert torch.equal(cast_logits, uncast_logits)
    assert cast_grads.keys() == uncast_grads.keys() and any("lora_A" in n for n in cast_grads)
    assert all(torch.equal(cast_grads[n], uncast_grads[n]) for n in cast_grads)


def test_bert_and_bf16_with_batches(tiny_bert, small_data, tmp_path):
    train_file, test_file = small_data
    cfg = tiny_config(tiny_bert, train_file, test_file, tmp_path / "run", **{"train.precision": "bf16", "train.epochs": 1})
    result = train(cfg, echo=lambda _: None)
    assert result.metrics["train"]["precision"] == "bf16"
    assert result.metrics["parity"]["merge_max_abs_diff"] < 1e-4
    assert result.metrics["parity"]["reload_max_abs_diff"] < 1e-4


def test_report_files_and_plots(qwen_run):
    from PIL import Image

    _, result = qwen_run
    run = result.run_dir
    for name in ("confusion_matrix.png", "training_curves.png", "confidence_histogram.png"):
        with Image.open(run / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "random_head" in html and "tfidf" in html
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    lora = result.metrics["lora"]
    assert len(errors) == round(lora["n"] * (1 - lora["accuracy"]))
    assert all(e["gold"] != e["predicted"] and 0 < e["confidence"] <= 1 and ":" in e["source"] for e in errors)


def test_token_counts_show_the_padding_the_reference_pays_for(tiny_qwen2, tmp_path, small_data):
    """Padding every text to max_length (the reference) vs per batch: the counter must tell them apart."""
    train_file, test_file = small_data
    shares = {}
    for pad in (True, False):
        cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / str(pad), **{
            "train.pad_to_max_length": pad, "train.epochs": 1, "train.batch_size": 4, "data.max_length": 64,
            "data.valid_fraction": 0.0, "eval.baselines": [],
        })
        result = train(cfg, echo=lambda _: None)
        t = result.metrics["train"]
        shares[pad] = t["padding_share"]
        lengths = [len(ids) for ids in load_tokenizer(str(tiny_qwen2))([ex.text for ex in load_data(cfg).train], truncation=True, max_length=64)["input_ids"]]
        assert 0 < t["eval_during_training_s"] < t["seconds"]  # throughput leaves the per-epoch evaluation out
        training = t["seconds"] - t["eval_during_training_s"]
        rounding = t["real_tokens_per_s"] * 0.011 + 0.05 * training + 1  # both seconds are rounded to 0.01, tokens/s to 0.1
        assert t["real_tokens_per_s"] * training == pytest.approx(sum(lengths), abs=rounding)
    assert shares[True] > shares[False] >= 0


def test_gradient_checkpointing_changes_memory_not_results(tiny_qwen2, tmp_path, small_data):
    """Checkpointing runs each layer's attention again in the backward pass; dropout is replayed, so the steps agree."""
    from torch.nn.modules.module import register_module_forward_hook

    train_file, test_file = small_data
    losses, layer_calls = {}, {}
    for checkpointing in (False, True):
        cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / str(checkpointing), **{
            "train.gradient_checkpointing": checkpointing, "train.epochs": 1, "train.logging_steps": 1, "eval.baselines": [],
        })
        calls = []
        hook = register_module_forward_hook(
            lambda module, args, out: calls.append(1) if module.training and type(module).__name__ == "Qwen2Attention" else None
        )
        try:
            result = train(cfg, echo=lambda _: None)
        finally:
            hook.remove()
        losses[checkpointing] = [e["loss"] for e in result.metrics["train"]["log_history"] if "loss" in e]
        layer_calls[checkpointing] = len(calls)
    assert layer_calls[True] == 2 * layer_calls[False] > 0
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def padding_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    batches = [[lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


def test_length_buckets_pad_less_than_hf_and_still_shuffle():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from intentlora.train import LengthBucketSampler

    torch.manual_seed(0)
    lengths = torch.randint(1, 40, (378,)).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=16, seed=42)
    first = list(sampler)
    assert list(sampler) == first == list(LengthBucketSampler(lengths, batch_size=16, seed=42))  # (seed, epoch) decide
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(378))
    assert first != second
    # Every batch but the last (378 = 23 x 16 + 10) is full and cut from one sorted span.
    assert len({lengths[i] for i in first[-10:]}) <= 3
    ours = padding_share(first, lengths, 16)
    hf = padding_share(list(LengthGroupedSampler(16, lengths=lengths)), lengths, 16)
    shuffled = padding_share(torch.randperm(378).tolist(), lengths, 16)
    assert ours < 0.05 < hf < shuffled
