import pytest
import torch
from peft import PeftModel

from intentlora.config import LoraConfig, ModelConfig
from intentlora.models import (
    CpuDropout,
    PickleWeightsError,
    add_lora,
    head_with_outputs,
    load_classifier,
    load_tokenizer,
    parameter_counts,
    resolve_model_path,
    target_modules_for,
)
from intentlora.inference import batched_logits

LABELS = ["a", "b", "c"]


def classifier(folder, dtype=torch.float32):
    tokenizer = load_tokenizer(str(folder))
    return load_classifier(str(folder), LABELS, tokenizer.pad_token_id, dtype), tokenizer


def test_pad_token_is_set_and_written_into_the_config(tiny_qwen2):
    model, tokenizer = classifier(tiny_qwen2)
    assert tokenizer.pad_token == "<|endoftext|>"  # the eos: this tokenizer shipped without a pad
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.label2id["c"] == 2


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_bert"])
def test_batches_give_the_same_logits_as_single_texts(fixture, request):
    model, tokenizer = classifier(request.getfixturevalue(fixture))
    texts = ["查余额", "我的信用卡昨天在地铁上丢了，怎么挂失", "refund please", "卡被盗刷了 help!!"]
    batched = batched_logits(model, tokenizer, texts, batch_size=4)
    single = torch.cat([batched_logits(model, tokenizer, [t], batch_size=1) for t in texts])
    assert batched.shape == (4, 3)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_target_modules_follow_the_architecture(tiny_qwen2, tiny_bert):
    assert target_modules_for(classifier(tiny_qwen2)[0]) == ["q_proj", "v_proj"]
    assert target_modules_for(classifier(tiny_bert)[0]) == ["query", "value"]
    assert target_modules_for(classifier(tiny_bert)[0], ["key"]) == ["key"]
    assert target_modules_for(classifier(tiny_bert)[0], ["all-linear"]) == "all-linear"


def test_bf16_weights_are_read_in_bf16_and_computed_in_fp32(tiny_qwen2):
    """training's bf16-weights: the fp32 folder's weights rounded to bf16, held and computed in fp32."""
    rounded = load_classifier(str(tiny_qwen2), ["a", "b"], 0, torch.float32, weights_dtype=torch.bfloat16)
    exact = load_classifier(str(tiny_qwen2), ["a", "b"], 0, torch.float32)
    weights = {name: p for name, p in exact.named_parameters() if not name.startswith("score")}
    assert {p.dtype for p in rounded.parameters()} == {torch.float32}
    assert any(not torch.equal(p, p.bfloat16().float()) for p in weights.values())  # the folder holds more than bf16
    for name, p in rounded.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name].bfloat16().float()), name


def test_lora_trains_adapters_and_head_only_in_fp32(tiny_qwen2):
    model, _ = classifier(tiny_qwen2, torch.bfloat16)
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8))
    assert isinstance(peft_model, PeftModel)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("score" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert any(p.dtype == torch.bfloat16 for n, p in peft_model.named_parameters() if not p.requires_grad)
    n_trainable, n_total = parameter_counts(peft_model)
    assert 0 < n_trainable < n_total


def test_cpu_dropout_drops_p_of_the_elements_and_keeps_the_expectation():
    dropout = CpuDropout(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.001  # 4.5 standard deviations of a rate over 1e6 draws
    assert torch.allclose(y[y != 0], torch.tensor(dropout.scale)) and abs(dropout.scale - 1 / 0.95) < 1e-4
    assert abs(y.mean().item() - 1) < 0.002
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through the kept elements, scaled alike
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the seed decides the mask, so runs and resumes repeat
    assert not torch.equal(dropout(x), y)
    assert dropout(x.detach().bfloat16()).dtype == torch.bfloat16
    dropout.eval()
    assert dropout(x) is x


def test_lora_dropout_on_cpu_is_cpu_dropout_with_the_configured_rate(tiny_qwen2):
    peft_model = add_lora(classifier(tiny_qwen2)[0], LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["all-linear"]))
    dropouts = [d for n, d in peft_model.named_modules() if ".lora_dropout." in n]
    adapted = [n for n, _ in peft_model.named_parameters() if ".lora_A." in n]
    assert len(dropouts) == len(adapted) and all(isinstance(d, CpuDropout) and d.p == 0.1 for d in dropouts)
    no_dropout = add_lora(classifier(tiny_qwen2)[0], LoraConfig(r=4, alpha=8, dropout=0.0))
    assert not any(isinstance(m, CpuDropout) for m in no_dropout.modules())


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_bert"])
def test_top_layers_adapts_every_linear_layer_of_the_last_layers_only(fixture, request):
    model, tokenizer = classifier(request.getfixturevalue(fixture))
    count = model.config.num_hidden_layers
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["all-linear"], top_layers=1))
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    everywhere = add_lora(classifier(request.getfixturevalue(fixture))[0], LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))
    every = {n.split(".lora_A")[0] for n, _ in everywhere.named_parameters() if ".lora_A." in n}
    assert adapted and adapted == {n for n in every if f".{count - 1}." in n}

    batch = tokenizer(["查余额", "refund please"], padding=True, return_tensors="pt")
    peft_model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert {n for n, p in peft_model.named_parameters() if p.grad is not None} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad}  # the adapters and the head learn


def test_top_layers_must_fit_the_model(tiny_qwen2):
    model, _ = classifier(tiny_qwen2)
    with pytest.raises(ValueError, match="lora.top_layers must be between 1 and the model's 2 layers, got 3"):
        add_lora(model, LoraConfig(target_modules=["all-linear"], top_layers=3))


def test_pickle_weights_are_refused_unless_allowed(pickled_qwen2, tiny_qwen2):
    with pytest.raises(PickleWeightsError, match=r"pickle files only \(pytorch_model.bin\).*--allow-pickle"):
        classifier(pickled_qwen2)
    tokenizer = load_tokenizer(str(pickled_qwen2))
    allowed = load_classifier(str(pickled_qwen2), LABELS, tokenizer.pad_token_id, options=ModelConfig(allow_pickle=True))
    reference = classifier(tiny_qwen2)[0]
    torch.testing.assert_close(allowed.model.embed_tokens.weight, reference.model.embed_tokens.weight, atol=0, rtol=0)
    safe = load_classifier(str(tiny_qwen2), LABELS, tokenizer.pad_token_id, options=ModelConfig(allow_pickle=True))  # safetensors still come first
    assert safe.config.num_labels == 3


def test_resolve_model_path_keeps_hub_ids_and_rejects_missing_gguf(tmp_path, tiny_qwen2):
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_model_path(str(tiny_qwen2)) == str(tiny_qwen2)
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(Exception, match="unknown offline model"):
        resolve_model_path("pypi:nope")


def test_a_head_can_be_resized_for_another_label_set():
    """Each adapter of a shared base gets a head for its own labels (RoBERTa-style nested heads too)."""
    linear = torch.nn.Linear(8, 5)
    assert (head_with_outputs(linear, 3).in_features, head_with_outputs(linear, 3).out_features) == (8, 3)
    nested = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    resized = head_with_outputs(nested, 3)
    assert resized[0].out_features == 8 and resized[2].out_features == 3
    assert nested[2].out_features == 5  # the base head is left alone
