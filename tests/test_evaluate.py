import pytest
import torch

from intentlora.data import Example
from intentlora.evaluate import classification_metrics, tfidf_baseline
from intentlora.zeroshot import AnswerTrie, shared_prefix, zero_shot_prompts, zero_shot_scores
from intentlora.models import load_causal_lm, load_tokenizer

LABELS = ["balance", "card_lost", "fraud_risk", "other", "refund"]


def test_metrics_against_hand_computed_values():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    m = classification_metrics(gold, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P=1/2 R=1/2 F=1/2; b: P=2/3 R=1 F=0.8; c: P=1 R=1/2 F=2/3
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "present": True}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_metrics_count_labels_never_predicted():
    m = classification_metrics([0, 1, 2], [0, 0, 0], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "present": True}
    assert m["macro_f1"] == pytest.approx((0.5 + 0 + 0) / 3)  # in the gold labels: it counts, as a 0


def test_macro_f1_leaves_out_labels_absent_from_gold_and_predictions():
    """A label the test set lacks and the model never predicts has no F1; counting it as 0 would halve this score."""
    m = classification_metrics([0, 1, 0, 1], [0, 1, 0, 1], ["a", "b", "c", "d"])
    assert m["macro_f1"] == 1.0 and m["absent_labels"] == ["c", "d"]
    assert m["per_class"]["c"]["present"] is False and m["per_class"]["a"]["present"] is True
    predicted_only = classification_metrics([0, 0], [0, 2], ["a", "b", "c"])  # c predicted, never gold: a false positive counts
    assert predicted_only["absent_labels"] == ["b"] and predicted_only["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_tfidf_beats_chance_on_the_bundled_data(bundled_rows):
    to_examples = lambda rows: [Example(r["text"], r["label"], f"x:{i}") for i, r in enumerate(rows)]  # noqa: E731
    m = tfidf_baseline(to_examples(bundled_rows["train"]), to_examples(bundled_rows["test"]), LABELS)
    assert m["macro_f1"] > 0.5  # chance is 0.2 for five balanced labels


@pytest.mark.parametrize("answer_rows", [1, 40])
def test_zero_shot_with_shared_caches_equals_scoring_each_pair_alone(tiny_qwen2, answer_rows):
    """The shared prompt cache, the answer trie and the tree mask change no score: each (text, label) scored alone agrees."""
    tokenizer = load_tokenizer(str(tiny_qwen2))
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    model = load_causal_lm(str(tiny_qwen2))
    texts = ["查余额", "我的卡丢了怎么办啊，急", "refund please", "x"]  # different lengths: padded batches
    labels = ["balance", "card", "card_lost", "card_arrival", "other"]  # "card" is a prefix of two others
    scores = zero_shot_scores(model, tokenizer, texts, labels, {"balance": "余额"}, answer_rows=answer_rows)
    assert scores.shape == (4, 5)
    prompts = zero_shot_prompts(tokenizer, texts, labels, {"balance": "余额"})
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            answer = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.inference_mode():
                logprobs = model(input_ids=torch.tensor([prompt + answer])).logits.log_softmax(-1)[0]
            expected = sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)


def test_the_answer_trie_feeds_a_shared_label_prefix_once():
    trie = AnswerTrie([[5, 6, 0], [5, 6, 7, 0], [5, 8, 0], [9, 0]])  # token ids; 0 ends each answer
    assert trie.tokens == [5, 6, 7, 8, 9] and trie.parents == [-1, 0, 1, 0, -1]
    # label 1 = 5 6 7 0: 5 after the prompt (column 0), 6 after node 0, 7 after node 1, the end after node 2
    assert trie.columns[1].tolist() == [0, 1, 2, 3] and trie.targets[1].tolist() == [5, 6, 7, 0]
    assert trie.valid[3].tolist() == [1, 1, 0, 0]


def test_the_shared_prefix_leaves_every_prompt_its_last_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == [1, 2]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert shared_prefix([[7, 8]]) == [7]


def test_zero_shot_baseline_scores_the_argmax_label(tiny_qwen2, bundled_rows):
    from intentlora.zeroshot import zero_shot_baseline

    tokenizer = load_tokenizer(str(tiny_qwen2))
    model = load_causal_lm(str(tiny_qwen2))
    examples = [Example(r["text"], r["label"], f"t:{i}") for i, r in enumerate(bundled_rows["test"][:6])]
    metrics = zero_shot_baseline(model, tokenizer, examples, LABELS)
    predicted = zero_shot_scores(model, tokenizer, [ex.text for ex in examples], LABELS).argmax(-1).tolist()
    assert metrics["accuracy"] == pytest.approx(sum(LABELS[p] == ex.label for p, ex in zip(predicted, examples)) / 6)
