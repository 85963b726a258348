"""Cross-chunk task for KV fusion: variable tracking in a tiny assignment language.

A program is lines `x = 4` (literal), `y = x` (copy: y takes x's value *now*), and
`assert y == 4` (the answer is y's current value), split into parts `# part N`. Names are
single letters and values single digits, so every name and value is one token: a lookup is
one attention step, and the model spends its depth on the copy semantics. (With two-digit
values a first model reached only ~40% on copies; see docs/REFERENCE_MODEL.md.)

Evaluation ("chain" kind): part a sets `A = v1`; a later part b copies `B = A`; after that
line `A` is overwritten with `A = v2`. The question is `assert B == ` → v1. Resolving `B`
at question time (find `B = A`, then find `A`) gives the latest value v2, which is wrong:
the right value must have been copied into the tokens of `B = A` while they were computed
with part a in view. Under full reuse part b was computed alone, so that information never
entered its KV cache. The "direct" kind (`B = v1` as a literal, never overwritten) is the
control: it needs no flow between chunks, so full reuse should keep it.

Train/eval separation. A one-token name the model never saw as a name cannot be looked up
(measured: 27% on the control with 12 held-out letters), so both splits use the same 40
letters (the 12 letters that splits.split_of reserves are never program names). What is
disjoint instead: the seed streams (salted per split), and the template: evaluation
prompts are chunked programs with a planted chain and a single final question and no other
assert, while training documents interleave asserts on ~30% of their lines. Values are
drawn afresh for every program, so no binding can be memorised.

Training documents are long programs with asserts
everywhere, many of them on copies whose source was overwritten later.

Layouts: the first reference model's is 4 chunks x 16 lines (~430 tokens); the long model's is
the fusion benchmark's, 6 chunks of up to 512 tokens each (`chunk_tokens=512`: every line is 6
bytes, so a chunk holds its header and 83 lines, 507 tokens, 508 with the first chunk's BOS).
At that length the chain's lookups reach back thousands of tokens, past hundreds of distractor
lines, which short training programs (every name reassigned every few dozen lines) never ask
for; training_long_program_doc covers it. training_chain_doc teaches the chain itself: the
evaluation's chunked layout at 2-8 chunks of 48-512 tokens, several planted chains and a
question on each at the end, drawn from the training seed stream (reference-long's first job
answered copies at chance at every distance; docs/REFERENCE_MODEL.md, "Teaching the chain").
"""
from __future__ import annotations

import random
import string

from kvcompile.eval.retrieval import answer_of
from kvcompile.eval.splits import all_names, seeded_rng
from kvcompile.frontend.tokenizer import ByteTokenizer

NAME_ALPHABET = string.ascii_letters
KINDS = ("chain", "direct")
MODES = ("full_prefill", "full_reuse")

_TOKENIZER = ByteTokenizer()
# The letters the name split keeps for training; evaluation programs use them too (see above).
PROGRAM_NAMES = tuple(all_names(1, "train", NAME_ALPHABET))


def part_header(number: int) -> str:
    return f"# part {number}\n"


def question_text(name: str) -> str:
    return f"assert {name} == "


def _literal(rng: random.Random) -> str:
    return str(rng.randint(0, 9))  # one token: a guess is right 1 time in 10


def training_program_doc(rng: random.Random, target_bytes: int) -> str:
    """A training-split program of about `target_bytes`, asserts on ~30% of the lines."""
    pool = rng.sample(PROGRAM_NAMES, rng.randint(8, len(PROGRAM_NAMES)))
    env: dict[str, str] = {}          # name -> current value
    copied_from: dict[str, str] = {}  # name -> the name it was last copied from
    stale: set[str] = set()           # copies whose source has changed since: the hard asserts
    asked: set[str] = set()           # names asserted since their last assignment
    lines: list[str] = []
    size, part, lines_left_in_part = 0, 1, 0
    while size < target_bytes:
        if lines_left_in_part == 0:
            lines.append(part_header(part))
            part += 1
            lines_left_in_part = rng.randint(4, 20)
        lines_left_in_part -= 1
        draw = rng.random()
        defined = list(env)
        if len(defined) >= 2 and draw < 0.3:
            # Ask each value once: a repeated assert could be answered by copying the last one.
            line = _assert_line(rng, env, stale, asked, [n for n in defined if n not in asked], defined)
        elif defined and draw < 0.6:
            source = rng.choice(defined)  # uniform over all defined names: long distances
            fresh = [n for n in pool if n not in env]
            if fresh and rng.random() < 0.7:
                dest = rng.choice(fresh)
            else:
                dest = rng.choice(pool)
            if dest == source:
                continue
            line = _assignment_line(rng, env, copied_from, stale, asked, dest, source)
        else:
            fresh = [n for n in pool if n not in env]
            dest = rng.choice(fresh) if fresh and rng.random() < 0.6 else rng.choice(pool)
            line = _assignment_line(rng, env, copied_from, stale, asked, dest, None)
        lines.append(line)
        size += len(line)
    return "".join(lines)


def _assert_line(rng: random.Random, env, stale, asked, unasked: list[str], others: list[str]) -> str:
    """An assert: on a stale copy half the time there is one, else mostly on a name not asked
    since its last assignment (`unasked`), else on any of `others`."""
    if stale and rng.random() < 0.5:
        name = rng.choice(sorted(stale))
    elif unasked and rng.random() < 0.8:
        name = rng.choice(unasked)
    else:
        name = rng.choice(others)
    stale.discard(name)
    asked.add(name)
    return f"assert {name} == {env[name]}\n"


def _assignment_line(rng: random.Random, env, copied_from, stale, asked, dest: str, source: str | None) -> str:
    """`dest = source` (a copy) or, with no source, `dest = <a fresh literal>`: applied, and as a line."""
    if source is None:
        _assign(env, copied_from, stale, dest, _literal(rng))
        line = f"{dest} = {env[dest]}\n"
    else:
        _assign(env, copied_from, stale, dest, env[source])
        copied_from[dest] = source
        line = f"{dest} = {source}\n"
    asked.discard(dest)
    return line


def _assign(env, copied_from, stale, dest, value) -> None:
    """Set dest; copies of dest whose value now differs from dest become stale."""
    env[dest] = value
    copied_from.pop(dest, None)
    stale.discard(dest)
    for name, source in copied_from.items():
        if source == dest and env[name] != value:
            stale.add(name)


LINE_BYTES = len("x = 4\n")  # every program line: one-token names and values


def chunk_line_budget(chunk: int, chunk_tokens: int) -> int:
    """Lines that fit in chunk `chunk` (0-based) of at most `chunk_tokens` tokens."""
    room = chunk_tokens - len(part_header(chunk + 1)) - (1 if chunk == 0 else 0)  # BOS on the first
    lines = room // LINE_BYTES
    if lines < 4:  # a chain puts up to 2 special lines into one chunk; keep some distractors
        raise ValueError(f"chunks of {chunk_tokens} tokens are too short for the cross-chunk task")
    return lines


def training_long_program_doc(rng: random.Random, target_bytes: int) -> str:
    """A training-split program of about `target_bytes` whose lookups reach far back.

    Most lines move a crowd of distractor names (literals, and copies from any of them, as in
    the evaluation's chunks). A few "cold" names are touched rarely (1-4% of lines): assigned
    a literal, or copied from another cold name (sometimes from a distractor), and overwritten
    later, so a copy's source often sits hundreds to thousands of tokens back and goes stale.
    Asserts (~4% of lines) ask mostly about cold names, stale copies first; `# part N`
    headers every 40-120 lines mimic the chunked layout. Every assert is true (tests run an
    interpreter over these documents)."""
    names = rng.sample(PROGRAM_NAMES, len(PROGRAM_NAMES))
    n_cold = rng.randint(2, 6)
    cold, hot = names[:n_cold], names[n_cold:]
    cold_rate = rng.uniform(0.01, 0.04)
    env: dict[str, str] = {}
    copied_from: dict[str, str] = {}
    stale: set[str] = set()
    asked: set[str] = set()
    lines: list[str] = []
    size, part, left_in_part = 0, 1, 0
    while size < target_bytes:
        if left_in_part == 0:
            lines.append(part_header(part))
            size += len(lines[-1])
            part += 1
            left_in_part = rng.randint(40, 120)
        left_in_part -= 1
        draw = rng.random()
        cold_set = [n for n in cold if n in env]
        if draw < cold_rate:
            dest = rng.choice(cold)
            sources = [n for n in cold_set if n != dest]
            source = None
            if sources and rng.random() < 0.6:
                hot_set = [n for n in hot if n in env]
                source = rng.choice(hot_set) if hot_set and rng.random() < 0.2 else rng.choice(sources)
            line = _assignment_line(rng, env, copied_from, stale, asked, dest, source)
        elif draw < cold_rate + 0.04 and len(env) >= 2:
            line = _assert_line(rng, env, stale, asked, [n for n in cold_set if n not in asked], sorted(env))
        else:
            dest = rng.choice(hot)
            hot_set = [n for n in hot if n in env and n != dest]
            source = rng.choice(hot_set) if hot_set and rng.random() < 0.4 else None
            line = _assignment_line(rng, env, copied_from, stale, asked, dest, source)
        lines.append(line)
        size += len(line)
    return "".join(lines)


CHAIN_DOC_CHUNKS = (2, 8)              # chunk counts of training_chain_doc
CHAIN_DOC_CHUNK_TOKENS = (48, 512)     # and tokens per chunk: the evaluation's 512 is the longest


def training_chain_doc(rng: random.Random, target_bytes: int) -> str:
    """A training-split document in the evaluation's chunked layout, with several planted chains.

    `# part N` chunks of equal size (2-8 chunks of 48-512 tokens, drawn to fit `target_bytes`,
    so short documents are the short-range, easier versions of the task; in ~1% of documents a
    small chunk gets more planted lines than its room and grows) filled with distractor lines
    as in cross_chunk_example. Planted in them: 1-9 chains (`S = v1` in a chunk, `T = S` in a
    later one, and usually `S = v2` after the copy, so that resolving T at question time gives
    the stale v2) and 0-2 literals never overwritten. The document ends with one assert per
    planted name, in random order, the first right after the last chunk as the evaluation's
    question is; half the documents also assert distractors inside the chunks (4-15% of
    lines, mostly copies: short-range versions of the skill, and more answers). Planted names
    are never asserted before the end, so no answer can be read off an earlier assert. Every
    assert is true (tests run an interpreter)."""
    n_chunks = rng.randint(*CHAIN_DOC_CHUNKS)
    low, high = CHAIN_DOC_CHUNK_TOKENS
    while n_chunks > 2 and target_bytes // n_chunks < low:
        n_chunks -= 1
    chunk_tokens = max(low, min(high, rng.randint(low, max(low, target_bytes // n_chunks - 24))))
    budgets = [chunk_line_budget(c, chunk_tokens) for c in range(n_chunks)]
    names = rng.sample(PROGRAM_NAMES, len(PROGRAM_NAMES))
    # At most a third of the lines are planted, and at least 20 names stay distractors.
    n_chains = rng.randint(1, max(1, min(9, n_chunks + 3, sum(budgets) // 9)))
    n_direct = rng.randint(0, 2)
    planted, distractors = names[:2 * n_chains + n_direct], names[2 * n_chains + n_direct:]
    answers: dict[str, str] = {}
    specials: list[tuple[int, float, str]] = []
    for k in range(n_chains):
        source, target = planted[2 * k], planted[2 * k + 1]
        answer = _literal(rng)
        first = rng.randrange(n_chunks - 1)
        copy_chunk = rng.randrange(first + 1, n_chunks)
        copy_slot = rng.random()
        specials += [(first, rng.random(), f"{source} = {answer}\n"),
                     (copy_chunk, copy_slot, f"{target} = {source}\n")]
        if rng.random() < 0.85:  # the trap; without it the copy is also right when resolved late
            trap = answer
            while trap == answer:
                trap = _literal(rng)
            over_chunk = rng.randrange(copy_chunk, n_chunks)
            over_slot = rng.uniform(copy_slot, 1.0) if over_chunk == copy_chunk else rng.random()
            specials.append((over_chunk, over_slot, f"{source} = {trap}\n"))
        answers[target] = answer
    for name in planted[2 * n_chains:]:
        answers[name] = _literal(rng)
        specials.append((rng.randrange(n_chunks), rng.random(), f"{name} = {answers[name]}\n"))

    assert_rate = rng.uniform(0.04, 0.15) if rng.random() < 0.5 else 0.0
    env: dict[str, str] = {}
    copied: set[str] = set()  # distractors whose current value came by a copy
    asked: set[str] = set()   # asserted since their last assignment: not asked again
    chunk_texts = []
    for c in range(n_chunks):
        # Planted lines at equal slots keep their order (a copy's overwrite follows the copy).
        mine = sorted((slot, order, text) for order, (chunk, slot, text) in enumerate(specials) if chunk == c)
        n_lines = max(1, budgets[c] - len(mine))
        body = []
        for _ in range(n_lines):
            unasked = sorted(set(env) - asked)
            if unasked and rng.random() < assert_rate:
                copies = sorted(copied - asked)
                name = rng.choice(copies if copies and rng.random() < 0.7 else unasked)
                asked.add(name)
                body.append(f"assert {name} == {env[name]}\n")
                continue
            dest = rng.choice(distractors)
            if env and rng.random() < 0.4:
                src = rng.choice(sorted(env))
                if src != dest:
                    env[dest] = env[src]
                    copied.add(dest)
                    asked.discard(dest)
                    body.append(f"{dest} = {src}\n")
                    continue
            env[dest] = _literal(rng)
            copied.discard(dest)
            asked.discard(dest)
            body.append(f"{dest} = {env[dest]}\n")
        for offset, (slot, _, text) in enumerate(mine):
            body.insert(min(len(body), int(slot * (n_lines + 1)) + offset), text)
        chunk_texts.append(part_header(c + 1) + "".join(body))
    asked = list(answers)
    rng.shuffle(asked)
    return "".join(chunk_texts) + "".join(f"{question_text(name)}{answers[name]}\n" for name in asked)


def cross_chunk_example(index: int, seed: int = 0, kind: str = "chain", n_chunks: int = 4,
                        lines_per_chunk: int = 16, split: str = "eval",
                        chunk_tokens: int | None = None) -> dict:
    """{"chunks": [ids...] (BOS on the first), "question": ids, "answer": v1, "trap": v2|None}.

    chunk_tokens: when given, each chunk is filled to at most that many tokens (special lines
    included) and lines_per_chunk is ignored."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n_chunks < 2:
        raise ValueError("the cross-chunk task needs at least two chunks")
    # A token budget gets its own seed stream (negative, so it never meets a line count).
    layout_key = lines_per_chunk if chunk_tokens is None else -chunk_tokens
    rng = seeded_rng(split, seed, 2, KINDS.index(kind), n_chunks, layout_key, index)
    names = rng.sample(PROGRAM_NAMES, len(PROGRAM_NAMES))  # a shuffle: 38 distractors
    target, source, distractors = names[0], names[1], names[2:]
    answer = _literal(rng)
    trap = None
    # (chunk, line) slots for the special lines; lines inserted at equal slots keep this order.
    specials: list[tuple[int, float, str]] = []
    if kind == "chain":
        first = rng.randrange(n_chunks - 1)
        copy_chunk = rng.randrange(first + 1, n_chunks)
        copy_slot = rng.random()
        overwrite_chunk = rng.randrange(copy_chunk, n_chunks)
        overwrite_slot = rng.uniform(copy_slot, 1.0) if overwrite_chunk == copy_chunk else rng.random()
        trap = answer
        while trap == answer:
            trap = _literal(rng)
        specials += [(first, rng.random(), f"{source} = {answer}\n"),
                     (copy_chunk, copy_slot, f"{target} = {source}\n"),
                     (overwrite_chunk, overwrite_slot, f"{source} = {trap}\n")]
    else:
        specials.append((rng.randrange(n_chunks), rng.random(), f"{target} = {answer}\n"))

    chunk_texts = []
    defined: list[str] = []
    for c in range(n_chunks):
        mine = sorted((slot, text) for chunk, slot, text in specials if chunk == c)
        n_lines = lines_per_chunk if chunk_tokens is None else chunk_line_budget(c, chunk_tokens) - len(mine)
        body = []
        for _ in range(n_lines):
            if defined and rng.random() < 0.4:
                dest, src = rng.choice(distractors), rng.choice(defined)
                if dest != src:
                    body.append(f"{dest} = {src}\n")
                    defined.append(dest)
                    continue
            dest = rng.choice(distractors)
            body.append(f"{dest} = {_literal(rng)}\n")
            defined.append(dest)
        for offset, (slot, text) in enumerate(mine):
            body.insert(min(len(body), int(slot * (n_lines + 1)) + offset), text)
        chunk_texts.append(part_header(c + 1) + "".join(body))

    chunks = [_TOKENIZER.encode(t, add_bos=(i == 0)) for i, t in enumerate(chunk_texts)]
    return {"chunks": chunks, "question": _TOKENIZER.encode(question_text(target)),
            "answer": answer, "trap": trap, "text": "".join(chunk_texts) + question_text(target)}


def score_cross_chunk(runner, count: int = 20, seed: int = 0, modes=MODES, kinds=KINDS,
                      n_chunks: int = 4, lines_per_chunk: int = 16, chunk_tokens: int | None = None) -> dict:
    """Accuracy per kind and mode; for "chain", how often the stale (trap) value came out."""
    result: dict = {"count": count, "n_chunks": n_chunks, "lines_per_chunk": lines_per_chunk}
    if chunk_tokens is not None:
        first = cross_chunk_example(0, seed, kinds[0] if kinds else "chain", n_chunks, split="eval",
                                    chunk_tokens=chunk_tokens)
        result.update(lines_per_chunk=None, chunk_tokens=chunk_tokens,
                      prompt_tokens=sum(map(len, first["chunks"])) + len(first["question"]))
    for kind in kinds:
        per_mode: dict = {}
        for mode in modes:
            correct = trapped = 0
            for i in range(count):
                ex = cross_chunk_example(i, seed, kind, n_chunks, lines_per_chunk, chunk_tokens=chunk_tokens)
                got = answer_of(runner.greedy_fused(ex["chunks"], ex["question"], 2, mode))
                correct += got == ex["answer"]
                trapped += ex["trap"] is not None and got == ex["trap"]
            per_mode[mode] = correct / count
            if kind == "chain":
                per_mode[f"{mode}_trap"] = trapped / count
        result[kind] = per_mode
    return result
