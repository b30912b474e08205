"""Zero-shot baseline: the instruct model prompted with the intents, each label scored by likelihood.

No training, no generation to parse: every label's answer is scored after the
model's own chat prompt, and the likeliest wins. This is the honest "do I need
to fine-tune at all?" number next to LoRA.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from intentlora.data import Example
from intentlora.evaluate import classification_metrics
from intentlora.inference import attention_mask_for, autocast_for


ZERO_SHOT_INSTRUCTION = (
    "Classify the user's message into exactly one of these intents:\n{intents}\n"
    "Answer with the intent name only."
)


def zero_shot_prompts(tokenizer, texts: list[str], labels: list[str], descriptions: dict[str, str] | None) -> list[list[int]]:
    """Token ids of the instruct model's own chat prompt, one per text, ready for the answer."""
    descriptions = descriptions or {}
    intents = "\n".join(f"- {label}: {descriptions[label]}" if descriptions.get(label) else f"- {label}" for label in labels)
    instruction = ZERO_SHOT_INSTRUCTION.format(intents=intents)
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": instruction}, {"role": "user", "content": text}],
                add_generation_prompt=True, tokenize=True, return_dict=False,
            )
            for text in texts
        ]
    return [tokenizer(f"{instruction}\n\nMessage: {text}\nIntent: ", add_special_tokens=False)["input_ids"] for text in texts]


@torch.inference_mode()
def zero_shot_scores(model, tokenizer, texts: list[str], labels: list[str], descriptions: dict[str, str] | None = None,
                     answer_rows: int = 256) -> torch.Tensor:
    """Log-likelihood of each label's answer after each prompt: shape (texts, labels).

    Every label is scored, so there is no free generation and nothing to parse.
    The answer ends with the end-of-turn token, so a label that is a prefix of
    another cannot win by stopping early. What is computed once:
    - the prompt's start (system turn, instruction, label list: the same for
      every text) runs once; its KV cache serves every text;
    - the answers form a token trie: a prefix shared by several labels
      ("card_" in card_arrival, card_lost, ...) runs once per text, each node
      attending to the text and to its own ancestors only (a tree attention mask).
    Each text then costs its own tokens plus one token per trie node.
    `answer_rows` (texts x trie nodes per forward pass) bounds the logits' memory.
    """
    model.eval()
    device = next(model.parameters()).device
    prompts = zero_shot_prompts(tokenizer, texts, labels, descriptions)
    if not prompts:
        return torch.empty(0, len(labels))
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    trie = AnswerTrie([tokenizer(label, add_special_tokens=False)["input_ids"] + end for label in labels])
    prefix = shared_prefix(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))
    batch_size = max(1, answer_rows // (len(trie.tokens) + 1))
    scores = torch.empty(len(texts), len(labels))
    with autocast_for(model):
        prefix_cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache if prefix else None
        for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", unit="batch", leave=False):
            rows = order[start : start + batch_size]
            rests = [prompts[i][len(prefix) :] for i in rows]
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
            ids, positions, mask = tree_inputs(rests, trie, len(prefix), pad, device)
            logits = model(input_ids=ids, position_ids=positions, attention_mask=attention_mask_for(model, mask),
                           cache=cache, logits_to_keep=len(trie.tokens) + 1).logits.float()
            # Column 0 is the prompt's last token (it predicts each answer's first token), column 1 + n is trie node n.
            logprobs = logits[:, trie.columns, trie.targets] - logits.logsumexp(-1)[:, trie.columns]
            scores[rows] = (logprobs * trie.valid).sum(-1).cpu()
    return scores


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of every prompt, leaving each at least its last token (whose logits start the answer)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        n = next((k for k in range(n) if prompt[k] != first[k]), n)
    return first[:n]


class AnswerTrie:
    """The labels' answer tokens as a trie, flattened: one input token per node, each node's parent, and
    for every label the (column, token) pairs whose log-probabilities add up to its score."""

    def __init__(self, answers: list[list[int]]) -> None:
        nodes: dict[tuple[int, ...], int] = {}
        self.tokens: list[int] = []  # node n feeds this token ...
        self.parents: list[int] = []  # ... after node parents[n] (-1: after the prompt)
        columns, targets = [], []
        for answer in answers:
            path = []  # logits columns: 0 = the prompt's last token, 1 + n = node n
            for k in range(len(answer)):
                path.append(0 if k == 0 else 1 + nodes[tuple(answer[:k])])
                if k < len(answer) - 1 and tuple(answer[: k + 1]) not in nodes:  # the last token predicts nothing
                    nodes[tuple(answer[: k + 1])] = len(self.tokens)
                    self.tokens.append(answer[k])
                    self.parents.append(nodes[tuple(answer[:k])] if k else -1)
            columns.append(path)
            targets.append(answer)
        width = max(map(len, columns))
        self.columns = torch.tensor([c + [0] * (width - len(c)) for c in columns])
        self.targets = torch.tensor([t + [0] * (width - len(t)) for t in targets])
        self.valid = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in columns])

    def depth(self, node: int) -> int:
        return 1 if self.parents[node] < 0 else 1 + self.depth(self.parents[node])


def tree_inputs(rests: list[list[int]], trie: AnswerTrie, offset: int, pad: int, device):
    """input_ids, position_ids and a boolean (batch, 1, query, key) mask for [text's rest, left-padded] + [trie nodes].

    Positions continue the shared prefix (`offset` tokens, in the cache) as if
    each text stood alone: a rest of r tokens takes offset..offset+r-1, a node
    at depth d takes offset+r+d-1. Each rest token sees the prefix and the rest
    before it; each node sees the prefix, the whole rest, its ancestors and itself.
    """
    width, n_nodes = max(map(len, rests)), len(trie.tokens)
    query = width + n_nodes
    depths = torch.tensor([trie.depth(n) for n in range(n_nodes)])
    ancestry = torch.eye(n_nodes, dtype=torch.bool)
    for n, parent in enumerate(trie.parents):  # parents come before children: one pass closes the relation
        if parent >= 0:
            ancestry[n] |= ancestry[parent]
    ids = torch.full((len(rests), query), pad)
    positions = torch.full((len(rests), query), offset)
    mask = torch.zeros(len(rests), 1, query, offset + query, dtype=torch.bool)
    mask[..., :offset] = True
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for b, rest in enumerate(rests):
        first = width - len(rest)  # left padding: the rest ends in column width - 1
        ids[b, first:width] = torch.tensor(rest)
        ids[b, width:] = torch.tensor(trie.tokens)
        positions[b, first:width] = torch.arange(offset, offset + len(rest))
        positions[b, width:] = offset + len(rest) + depths - 1
        real = torch.zeros(width, dtype=torch.bool)
        real[first:] = True
        mask[b, 0, :width, offset : offset + width] = causal & real
        mask[b, 0, width:, offset : offset + width] = real
        mask[b, 0, width:, offset + width :] = ancestry
    # Every token sees itself: a padding row (never read) is then never all-masked, which would make NaNs
    # that a masked key still multiplies into the values.
    mask[:, 0, torch.arange(query), offset + torch.arange(query)] = True
    return ids.to(device), positions.to(device), mask.to(device)


def zero_shot_baseline(model, tokenizer, examples: list[Example], labels: list[str], descriptions: dict[str, str] | None = None) -> dict:
    scores = zero_shot_scores(model, tokenizer, [ex.text for ex in examples], labels, descriptions)
    label2id = {label: i for i, label in enumerate(labels)}
    return classification_metrics([label2id[ex.label] for ex in examples], scores.argmax(-1).tolist(), labels)
