"""Long-context key→value retrieval: a table of `key: value` lines, then `query key: `.

Every key is 5 lowercase letters and every value 4 digits, so a prompt built for a given
context length always has the same token count (batches need no padding), and guessing
scores 1e-4. The queried key is drawn uniformly over the table, so its depth is uniform.

Evaluation prompts: one query at the end. Training documents (same line format, keys from
the training split only) interleave queries of earlier keys with new pairs, so every
training sequence carries many answers at every distance.
"""
from __future__ import annotations

import random

from kvcompile.eval.splits import random_name, seeded_rng
from kvcompile.frontend.tokenizer import ByteTokenizer

KEY_LETTERS = 5
VALUE_DIGITS = 4
HEADER = "# lookup table\n"
PAIR_TOKENS = KEY_LETTERS + 2 + VALUE_DIGITS + 1  # "abcde: 1234\n"
QUERY_PREFIX = "query "
CONTEXT_LENGTHS = (512, 1024, 2048)

_TOKENIZER = ByteTokenizer()


def pair_line(key: str, value: str) -> str:
    return f"{key}: {value}\n"


def query_text(key: str) -> str:
    return f"{QUERY_PREFIX}{key}: "


def _value(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(VALUE_DIGITS))


def _unique_keys(rng: random.Random, count: int, split: str) -> list[str]:
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < count:
        key = random_name(rng, KEY_LETTERS, split)
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def pairs_for_context(context_tokens: int) -> int:
    """How many pairs fit so that BOS + header + pairs + query + answer ≤ context_tokens."""
    fixed = 1 + len(HEADER) + len(query_text("a" * KEY_LETTERS)) + VALUE_DIGITS
    pairs = (context_tokens - fixed) // PAIR_TOKENS
    if pairs < 2:
        raise ValueError(f"context {context_tokens} is too short for a retrieval prompt")
    return pairs


def retrieval_example(context_tokens: int, index: int, seed: int = 0,
                      split: str = "eval") -> dict:
    """One prompt: {"prompt": token ids with BOS, "answer": "1234", "depth": 0..1}."""
    rng = seeded_rng(split, seed, 1, context_tokens, index)
    n_pairs = pairs_for_context(context_tokens)
    keys = _unique_keys(rng, n_pairs, split)
    values = [_value(rng) for _ in keys]
    target = rng.randrange(n_pairs)
    text = HEADER + "".join(pair_line(k, v) for k, v in zip(keys, values)) + query_text(keys[target])
    return {
        "prompt": _TOKENIZER.encode(text, add_bos=True),
        "answer": values[target],
        "depth": target / max(1, n_pairs - 1),
    }


def retrieval_examples(context_tokens: int, count: int, seed: int = 0,
                       split: str = "eval") -> list[dict]:
    return [retrieval_example(context_tokens, i, seed, split) for i in range(count)]


def training_retrieval_doc(rng: random.Random, target_bytes: int, query_prob: float = 0.35) -> str:
    """A training-split table of about `target_bytes` with queries interleaved."""
    lines = [HEADER]
    size = len(HEADER)
    keys: list[str] = []
    values: list[str] = []
    seen: set[str] = set()
    while size < target_bytes:
        if len(keys) >= 2 and rng.random() < query_prob:
            j = rng.randrange(len(keys))  # uniform over the table: long distances are common
            line = query_text(keys[j]) + values[j] + "\n"
        else:
            key = random_name(rng, KEY_LETTERS, "train")
            if key in seen:
                continue
            seen.add(key)
            keys.append(key)
            values.append(_value(rng))
            line = pair_line(key, values[-1])
        lines.append(line)
        size += len(line)
    return "".join(lines)


def answer_of(generated: list[int]) -> str:
    """The digits the model produced, up to the first non-digit."""
    text = _TOKENIZER.decode(generated)
    digits = []
    for ch in text:
        if not ch.isdigit():
            break
        digits.append(ch)
    return "".join(digits)


def score_retrieval(runner, context_lengths=CONTEXT_LENGTHS, count: int = 20, seed: int = 0,
                    batch_size: int = 8) -> dict:
    """Exact-match accuracy per context length, greedy decoding of VALUE_DIGITS tokens."""
    result: dict = {"count": count}
    for context in context_lengths:
        examples = retrieval_examples(context, count, seed)
        correct = 0
        for start in range(0, count, batch_size):
            batch = examples[start:start + batch_size]
            outputs = runner.greedy([e["prompt"] for e in batch], VALUE_DIGITS)
            correct += sum(answer_of(o) == e["answer"] for o, e in zip(outputs, batch))
        result[str(context)] = correct / count
    return result
