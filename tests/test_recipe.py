"""The few-example recipe options each do what they claim (tiny random models; quality lives in benchmarks/bench_quality.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments
from typer.testing import CliRunner

from intentlora.cli import app
from intentlora.config import DEFAULT_PROMPT_TEMPLATE, load_config
from intentlora.data import Example
from intentlora.inference import apply_template, batched_logits, encode
from intentlora.models import add_lora, init_head, label_word_rows, label_words, load_classifier, load_run, load_tokenizer, merge_run
from intentlora.predict import IntentClassifier
from intentlora.rundir import read_config, read_inference_settings
from intentlora.train import IntentTrainer, LinearProbeFirst, class_weights, load_data, tokenize, train
from tests.conftest import tiny_config, write_jsonl

LABELS = ["balance", "card_lost", "fraud_risk", "other", "refund"]
TEMPLATE = "Message: {text}\nIntent:"


def test_label_words_head_rows_are_the_output_embeddings_of_the_label_words(tiny_qwen2, bundled_rows):
    tokenizer = load_tokenizer(str(tiny_qwen2))
    model = load_classifier(str(tiny_qwen2), LABELS, tokenizer.pad_token_id)
    words = label_words(LABELS, {"other": "something else"})
    assert words == ["balance", "card lost", "fraud risk", "something else", "refund"]
    lm_head = load_file(tiny_qwen2 / "model.safetensors")["lm_head.weight"]  # untied: read from the checkpoint
    rows = label_word_rows(model, tokenizer, words, str(tiny_qwen2))
    for row, text in zip(rows, words):
        torch.testing.assert_close(row, lm_head[tokenizer(" " + text, add_special_tokens=False)["input_ids"]].mean(0))

    texts = [r["text"] for r in bundled_rows["train"][:32]]
    ids = encode(tokenizer, texts, 64, TEMPLATE)
    with torch.no_grad():
        model.score.weight.copy_(rows)
    raw = batched_logits(model, tokenizer, texts, prompt_template=TEMPLATE)
    # Labels the raw label-word scores agree with: a sharper (scaled-up) head fits them better, so the scale is > 0.
    targets = raw.argmax(-1)
    scale = init_head(model, "label_words", tokenizer=tokenizer, words=words, model_path=str(tiny_qwen2), probe=(ids, targets.tolist()))
    assert scale > 0
    torch.testing.assert_close(model.score.weight, scale * rows)
    logits = batched_logits(model, tokenizer, texts, prompt_template=TEMPLATE)
    assert torch.nn.functional.cross_entropy(logits, targets).item() < math.log(len(LABELS))


def test_zero_head_starts_at_ln_labels_and_random_does_not(tiny_qwen2, bundled_rows):
    tokenizer = load_tokenizer(str(tiny_qwen2))
    texts = [r["text"] for r in bundled_rows["train"][:16]]
    targets = torch.tensor([LABELS.index(r["label"]) for r in bundled_rows["train"][:16]])
    losses = {}
    for mode in ("random", "zero"):
        torch.manual_seed(0)
        model = load_classifier(str(tiny_qwen2), LABELS, tokenizer.pad_token_id)
        init_head(model, mode)
        losses[mode] = torch.nn.functional.cross_entropy(batched_logits(model, tokenizer, texts), targets).item()
    assert losses["zero"] == pytest.approx(math.log(5), abs=1e-6)
    assert losses["random"] != pytest.approx(math.log(5), abs=1e-4)


def test_truncation_cuts_the_text_not_the_template(tiny_qwen2, bundled_rows):
    tokenizer = load_tokenizer(str(tiny_qwen2))
    short, long = bundled_rows["train"][0]["text"], "".join(r["text"] for r in bundled_rows["train"][:30])
    fitted = encode(tokenizer, [short, long], 64, TEMPLATE)
    assert fitted[0] == tokenizer(apply_template([short], TEMPLATE))["input_ids"][0]  # what fits is the templated string's ids
    assert len(fitted[1]) <= 64 and len(tokenizer(apply_template([long], TEMPLATE))["input_ids"][0]) > 64
    decoded = tokenizer.decode(fitted[1])
    assert decoded.startswith("Message: " + long[:3]) and decoded.endswith("\nIntent:")
    assert len(encode(tokenizer, [long], 64)[0]) == 64  # no template: plain truncation
    with pytest.raises(ValueError, match="prompt_template alone"):
        encode(tokenizer, [long], 3, TEMPLATE)


@pytest.fixture(scope="module")
def template_run(tiny_qwen2, tmp_path_factory, bundled_rows):
    tmp = tmp_path_factory.mktemp("template-run")
    train_file = write_jsonl(tmp / "train.jsonl", bundled_rows["train"][:60])
    test_file = write_jsonl(tmp / "test.jsonl", bundled_rows["test"][:25])
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp / "run", **{
        "data.prompt_template": TEMPLATE, "lora.head_init": "label_words", "eval.baselines": [], "train.min_steps": 0,
    })
    return cfg, train(cfg, echo=lambda _: None), test_file


def test_the_template_is_applied_in_training_and_every_entry_point(template_run, tiny_qwen2, tmp_path):
    cfg, result, test_file = template_run
    tokenizer = load_tokenizer(str(tiny_qwen2))
    splits = load_data(cfg)
    trained_on = tokenize(tokenizer, splits.train, splits.labels, cfg)["input_ids"]
    assert trained_on == encode(tokenizer, [ex.text for ex in splits.train], cfg.data.max_length, TEMPLATE)
    assert tokenizer.decode(trained_on[0]).endswith("\nIntent:")

    texts = [ex.text for ex in splits.test]
    classifier = IntentClassifier.from_pretrained(result.run_dir)  # what predict, calibrate and serve load
    probs = classifier.probabilities(texts)
    model, _, _ = load_run(result.run_dir)
    torch.testing.assert_close(probs, batched_logits(model, tokenizer, texts, prompt_template=TEMPLATE).softmax(-1))
    assert not torch.allclose(probs, batched_logits(model, tokenizer, texts).softmax(-1), atol=1e-4)

    export = merge_run(result.run_dir, tmp_path / "export")
    assert read_inference_settings(export)["prompt_template"] == TEMPLATE
    torch.testing.assert_close(IntentClassifier.from_pretrained(export).probabilities(texts), probs, atol=1e-4, rtol=0)

    reported = result.metrics["lora"]
    for source in (["--adapter", str(result.run_dir)], ["--model", str(export)]):
        out = tmp_path / f"eval-{source[0][2:]}.json"
        cli = CliRunner().invoke(app, ["eval", "--data", str(test_file), *source, "--output", str(out)])
        assert cli.exit_code == 0, cli.output
        evaluated = json.loads(out.read_text())
        assert evaluated["macro_f1"] == pytest.approx(reported["macro_f1"], abs=1e-12)
        assert evaluated["accuracy"] == pytest.approx(reported["accuracy"], abs=1e-12)


def test_a_run_saved_before_templates_existed_is_read_as_bare_text(template_run, tmp_path):
    """The default template is new; a run whose config.yaml has no data.prompt_template trained on the bare text."""
    import yaml

    cfg, result, _ = template_run
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["prompt_template"] == TEMPLATE and read_config(result.run_dir).data.prompt_template == TEMPLATE
    del saved["data"]["prompt_template"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert load_config().data.prompt_template == DEFAULT_PROMPT_TEMPLATE  # what a fresh run gets
    assert read_config(tmp_path).data.prompt_template is None
    assert read_config(tmp_path).train == cfg.train  # the rest as saved


def peft_trainer(tiny_qwen2, tmp_path, **options):
    tokenizer = load_tokenizer(str(tiny_qwen2))
    model = add_lora(load_classifier(str(tiny_qwen2), LABELS, tokenizer.pad_token_id), tiny_config(tiny_qwen2, "x", "y", "z").lora)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, use_cpu=True, report_to="none")
    return IntentTrainer(model=model, args=args, **options), tokenizer


def test_balanced_class_weights_and_label_smoothing_change_the_loss(tiny_qwen2, tmp_path, bundled_rows):
    examples = [Example("a", "balance", "x:1")] * 6 + [Example("b", "refund", "x:2")] * 2
    weights = class_weights(examples, ["balance", "refund", "other"], "balanced")
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2), 0.0])
    assert class_weights(examples, ["balance", "refund"], "none") is None

    torch.manual_seed(0)
    rows = bundled_rows["train"][:12]
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    plain, tokenizer = peft_trainer(tiny_qwen2, tmp_path)
    weighted, _ = peft_trainer(tiny_qwen2, tmp_path, class_weights=weight)
    smoothed, _ = peft_trainer(tiny_qwen2, tmp_path, label_smoothing=0.2)
    with torch.no_grad():  # sharper logits, so per-class losses differ and the weights matter
        for name, param in plain.model.named_parameters():
            if "modules_to_save" in name:
                param.mul_(100)
    weighted.model.load_state_dict(plain.model.state_dict())
    smoothed.model.load_state_dict(plain.model.state_dict())
    inputs = tokenizer.pad({"input_ids": encode(tokenizer, [r["text"] for r in rows], 64)}, return_tensors="pt")
    inputs["labels"] = torch.tensor([LABELS.index(r["label"]) for r in rows])
    with torch.no_grad():
        logits = plain.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        loss_plain = plain.compute_loss(plain.model, dict(inputs))
        loss_weighted = weighted.compute_loss(weighted.model, dict(inputs))
        loss_smoothed = smoothed.compute_loss(smoothed.model, dict(inputs))
    assert loss_plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, inputs["labels"]).item(), abs=1e-6)
    assert loss_weighted.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, inputs["labels"], weight=weight).item(), abs=1e-6)
    assert abs(loss_weighted.item() - loss_plain.item()) > 1e-2
    assert loss_smoothed.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=0.2).item(), abs=1e-6)
    own = dict(inputs, labels=logits.argmax(-1))  # confident and right: what smoothing penalises, whatever the logits
    with torch.no_grad():
        gap = smoothed.compute_loss(smoothed.model, dict(own)) - plain.compute_loss(plain.model, dict(own))
    assert gap.item() > 1e-2


def test_head_lr_and_loraplus_set_the_learning_rate_of_each_part(tiny_qwen2, tmp_path):
    trainer, _ = peft_trainer(tiny_qwen2, tmp_path, head_lr=1e-2, loraplus_lr_ratio=16)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    seen = set()
    for name, param in trainer.model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "head" if "modules_to_save" in name else "lora_B" if "lora_B" in name else "lora_A"
        assert lr_of[id(param)] == pytest.approx({"head": 1e-2, "lora_B": 16e-4, "lora_A": 1e-4}[kind]), name
        seen.add(kind)
    assert seen == {"head", "lora_A", "lora_B"}
    default, _ = peft_trainer(tiny_qwen2, tmp_path)
    assert {group["lr"] for group in default.create_optimizer().param_groups} == {1e-4}


def test_min_steps_and_linear_probe_first(tiny_qwen2, small_data, tmp_path):
    """1 epoch of 36 texts is 5 steps; min_steps makes it 12. With the whole run a linear probe, LoRA B stays 0."""
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{
        "train.epochs": 1, "train.min_steps": 12, "train.linear_probe_steps": 12, "train.early_stopping_patience": None,
        "lora.head_init": "zero", "eval.baselines": [],
    })
    result = train(cfg, echo=lambda _: None)
    assert result.metrics["train"]["steps"] == 12 and not result.metrics["train"]["stopped_early"]
    weights = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    head = [w for k, w in weights.items() if "score" in k]
    assert lora_b and all(torch.count_nonzero(w) == 0 for w in lora_b)
    assert head and torch.count_nonzero(head[0]) > 0

    trainer, _ = peft_trainer(tiny_qwen2, tmp_path)
    probe = LinearProbeFirst(3)
    for step, lora_trains in ((0, False), (2, False), (3, True)):
        probe.on_step_begin(None, type("State", (), {"global_step": step})(), None, model=trainer.model)
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                assert param.requires_grad == lora_trains
            elif "modules_to_save" in name:
                assert param.requires_grad


def test_early_stopping_stops(tiny_qwen2, small_data, tmp_path):
    """Nothing can improve at a learning rate of 1e-12: patience 1 stops after the second evaluation."""
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{
        "train.epochs": 1, "train.min_steps": 50, "train.lr": 1e-12, "train.early_stopping_patience": 1, "eval.baselines": [],
        "lora.head_init": "random",  # a zero head ties every logit, so float noise at lr 1e-12 can flip predictions
    })
    result = train(cfg, echo=lambda _: None)
    t = result.metrics["train"]
    evaluations = [e for e in t["log_history"] if "eval_macro_f1" in e]
    assert t["stopped_early"] and t["max_steps"] == 50 and t["steps"] == 2 * 5  # two epochs of 5 steps
    assert len(evaluations) == 2


def test_without_a_validation_set_every_text_trains_and_nothing_is_evaluated(tiny_qwen2, small_data, tmp_path):
    """data.valid_fraction none: no split, no evaluation during training, early stopping idle; the report says so."""
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{
        "data.valid_fraction": None, "train.early_stopping_patience": 1, "train.lr": 1e-12, "train.min_steps": 20,
        "train.epochs": 1, "eval.baselines": []})
    result = train(cfg, echo=lambda _: None)
    t, d = result.metrics["train"], result.metrics["data"]
    assert d["valid"] == 0 and not d["valid_is_test"] and d["train"] == sum(1 for _ in open(train_file, encoding="utf-8"))
    assert not any("eval_loss" in e for e in t["log_history"])
    assert t["steps"] == 20 and not t["stopped_early"]  # patience 1 at lr 1e-12 stops after two evaluations when there are any
    assert "no validation set" in (result.run_dir / "README.md").read_text(encoding="utf-8")  # the model card


def test_select_best_without_validation_data_is_refused_before_the_model_loads(small_data):
    from intentlora.config import load_config
    from intentlora.train import load_data

    train_file, test_file = small_data  # 2 to 12 texts a label: 5% of one is no text
    cfg = load_config(None, {"data.train": str(train_file), "data.test": str(test_file), "train.select_best": True,
                             "data.valid_fraction": 0.05})
    with pytest.raises(ValueError, match="select_best .* there is none"):
        load_data(cfg, echo=lambda _: None)


def test_a_run_adapting_the_top_layers_saves_reloads_and_merges_them(tiny_qwen2, small_data, tmp_path):
    """Only the last layer's adapters are saved; the run's reload check passed (train raises otherwise); its export agrees."""
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{
        "lora.target_modules": ["all-linear"], "lora.top_layers": 1, "eval.baselines": []})
    result = train(cfg, echo=lambda _: None)
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0] for k in saved if ".lora_" in k}
    assert adapted and all(".layers.1." in k for k in adapted)
    assert {k.rsplit(".", 1)[-1] for k in adapted} == {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}
    texts = ["查余额", "退款", "卡丢了"]
    run_probs = IntentClassifier.from_pretrained(result.run_dir).probabilities(texts)
    export = merge_run(result.run_dir, tmp_path / "export")
    torch.testing.assert_close(IntentClassifier.from_pretrained(export).probabilities(texts), run_probs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("select_best", [True, False])
def test_the_saved_model_is_the_selected_checkpoint(select_best, tiny_qwen2, small_data, tmp_path):
    """select_best: the adapter saved is the best validation checkpoint's; off: the last step's."""
    train_file, test_file = small_data
    cfg = tiny_config(tiny_qwen2, train_file, test_file, tmp_path / "run", **{
        "train.epochs": 3, "train.select_best": select_best, "output.keep_checkpoints": True, "eval.baselines": [],
    })
    result = train(cfg, echo=lambda _: None)
    t = result.metrics["train"]
    last = result.run_dir / "checkpoints" / f"checkpoint-{t['steps']}"
    expected = (result.run_dir / "checkpoints" / Path(t["best_checkpoint"]).name) if select_best else last
    assert t["selected"] == ("best" if select_best else "last") and expected.is_dir()
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    chosen = load_file(expected / "adapter_model.safetensors")
    assert saved.keys() == chosen.keys()
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)


@pytest.mark.parametrize("key, value, message", [
    ("lora.head_init", "xavier", "head_init"),
    ("train.class_weights", "inverse", "class_weights"),
    ("train.label_smoothing", 1.0, "label_smoothing"),
    ("data.prompt_template", "no placeholder", "exactly once"),
    ("train.early_stopping_patience", 0, "early_stopping_patience"),
    ("train.head_lr", -1.0, "head_lr"),
    ("train.precision", "fp16", "fp32 or bf16-weights"),
    ("lora.top_layers", 0, "top_layers"),
])
def test_bad_recipe_settings_are_refused_before_loading(key, value, message, tmp_path):
    from intentlora.config import load_config
    from intentlora.train import check_settings

    with pytest.raises(ValueError, match=message):
        check_settings(load_config(None, {key: value}))
