"""training_chain_doc (the cross-chunk chain taught in the evaluation's layout) and the fifth
share of the training mix that draws it."""
import hashlib
import random
import re

import numpy as np
import pytest

from assignment_program import run_program
from kvcompile.eval import cross_chunk
from kvcompile.eval.cross_chunk import training_chain_doc
from kvcompile.reference import train
from kvcompile.reference.corpus import SequenceMixer, sequence_stream

TEXT = np.frombuffer(bytes(range(32, 127)) * 200, dtype=np.uint8)


def split_doc(doc: str) -> tuple[list[str], list[str]]:
    """(chunk texts with their headers, the final assert lines)."""
    parts = re.split(r"(?=^# part \d+\n)", doc, flags=re.M)
    assert parts[0] == ""
    chunks = parts[1:]
    tail = re.search(r"(?:^assert \w+ == \d\n)+\Z", chunks[-1], flags=re.M)
    assert tail, "the document ends with its questions"
    chunks[-1] = chunks[-1][:tail.start()]
    return chunks, tail[0].splitlines()


@pytest.mark.parametrize("seed", range(40))
def test_chains_resolve_to_the_copied_value_and_the_trap_differs(seed):
    rng = random.Random(seed)
    doc = training_chain_doc(rng, rng.choice([255, 1000, 4095, 8191]))
    _, asserts = run_program(doc)
    assert asserts and all(got == want for got, want in asserts)
    chunks, questions = split_doc(doc)
    assert [int(re.match(r"# part (\d+)", c)[1]) for c in chunks] == list(range(1, len(chunks) + 1))
    assert 2 <= len(chunks) <= 8
    body = "".join(chunks)
    for line in questions:
        name, answer = re.fullmatch(r"assert (\w+) == (\d)", line).groups()
        assert f"assert {name} ==" not in body  # never asked before the end
        (source,) = re.findall(rf"^{name} = (\w+)$", body, flags=re.M)  # planted once
        if source.isdigit():
            assert source == answer  # a literal, never overwritten
            continue
        copy_chunk = next(i for i, c in enumerate(chunks) if re.search(rf"^{name} = {source}$", c, flags=re.M))
        before = "".join(chunks[:copy_chunk])
        # The copied value was set in an earlier chunk, and only there before the copy.
        assert re.findall(rf"^{source} = (\w+)$", before, flags=re.M) == [answer]
        assert not re.search(rf"^{source} = ", chunks[copy_chunk].split(f"{name} = {source}\n")[0], flags=re.M)
        later = re.findall(rf"^{source} = (\d)$", body.split(f"{name} = {source}\n")[1], flags=re.M)
        assert len(later) <= 1 and answer not in later  # the trap, when there is one, differs


def test_most_chains_have_a_trap_and_documents_carry_several_questions():
    chains = trapped = questions = 0
    for seed in range(60):
        doc = training_chain_doc(random.Random(seed), 4095)
        chunks, asked = split_doc(doc)
        questions += len(asked)
        body = "".join(chunks)
        for line in asked:
            name = line.split()[1]
            source = re.search(rf"^{name} = (\w+)$", body, flags=re.M)[1]
            if not source.isdigit():
                chains += 1
                trapped += len(re.findall(rf"^{source} = \d$", body, flags=re.M)) == 2
    assert trapped / chains > 0.75 and questions / 60 > 3.5


def test_layouts_vary_and_short_documents_are_short_range():
    counts, sizes, unequal = set(), [], 0
    for seed in range(300):
        chunks, _ = split_doc(training_chain_doc(random.Random(seed), 4095))
        counts.add(len(chunks))
        if "assert" not in "".join(chunks):
            sizes.append(min(map(len, chunks[1:])))  # tokens of a chunk after the first (no BOS)
            # Equal chunks as in the evaluation, unless planted lines overflow a small one.
            unequal += len({len(c) for c in chunks[1:]}) > 1
    assert counts == set(range(2, 9)) and unequal <= 0.03 * len(sizes)
    assert min(sizes) < 128 and max(sizes) > 400 and max(sizes) <= 512
    for seed in range(50):
        doc = training_chain_doc(random.Random(seed), 255)
        chunks, _ = split_doc(doc)
        assert len(chunks) >= 2 and len(doc) < 400  # a 256-token sequence gets short-range chains


def test_training_stream_never_draws_an_evaluation_prompt():
    """The mixer draws from the training split's seed stream; evaluation prompts come from the
    eval split's. No evaluation chunk (2 x 64 or the 6 x 512 layout) shows up in training documents."""
    stream = sequence_stream(TEXT, 3100, seed=0, stream=0, mix=(0, 0, 0, 0, 1))
    training = b"".join(next(stream)[0].astype(np.uint8).tobytes() for _ in range(40))
    for n_chunks, chunk_tokens in ((2, 64), (6, 512)):
        for i in range(20):
            ex = cross_chunk.cross_chunk_example(i, 0, "chain", n_chunks, chunk_tokens=chunk_tokens)
            for chunk in ex["chunks"]:
                body = bytes(t for t in chunk if t < 256).split(b"\n", 1)[1]  # past the header
                assert body[:60] not in training


def test_five_share_mix_parses_and_draws_chain_documents():
    args = train.parse_args(["--out", "x", "--mix", "0.2,0.1,0.1,0.2,0.4"])
    mix = tuple(float(x) for x in args.mix.split(","))
    mixer, rng = SequenceMixer(TEXT, 1024, mix), random.Random(2)
    drawn = [mixer.sequence(rng) for _ in range(40)]
    assert {s for _, s in drawn} == {0, 1, 2, 3, 4}
    ids = next(ids for ids, s in drawn if s == 4)
    assert bytes(ids[1:10].astype(np.uint8)) == b"# part 1\n"
    with pytest.raises(ValueError):
        SequenceMixer(TEXT, 512, (1, 1, 1, 1, 1, 1))


def test_four_share_mix_draws_exactly_as_before_the_fifth_share():
    # Pinned at commit d61a1c5, before the chain source existed.
    mixer, rng = SequenceMixer(TEXT, 512, (0.1, 0.2, 0.3, 0.4)), random.Random(3)
    seqs = [mixer.sequence(rng) for _ in range(30)]
    assert [s for _, s in seqs] == [1, 3, 2, 3, 3, 3, 3, 2, 3, 2, 1, 3, 3, 2, 1, 0, 3, 3, 1, 1, 2, 0, 2, 2,
                                    3, 3, 1, 2, 1, 2]
    digest = hashlib.sha256(b"".join(ids.tobytes() for ids, _ in seqs)).hexdigest()
    assert digest == "a59f435254c7ab9abc2af08ea9adeb65aab7882d920a71d1bc565b89824ed72b"
