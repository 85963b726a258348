"""Task generators: deterministic, splits disjoint, and every answer checked by an interpreter."""
import random
import re

import numpy as np
import pytest

from assignment_program import run_program
from kvcompile.eval import cross_chunk, retrieval
from kvcompile.eval.splits import seeded_rng, split_of
from kvcompile.reference.corpus import SequenceMixer, is_heldout, module_key
from kvcompile.frontend.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("context", retrieval.CONTEXT_LENGTHS)
def test_retrieval_prompts_fill_their_context_and_answer_from_the_table(context):
    examples = retrieval.retrieval_examples(context, 5, seed=3)
    lengths = {len(e["prompt"]) for e in examples}
    assert len(lengths) == 1 and context - 64 < lengths.pop() + retrieval.VALUE_DIGITS <= context
    for e in examples:
        text = TOK.decode(e["prompt"])
        key = re.search(r"query (\w+): $", text)[1]
        table = dict(re.findall(r"^(\w+): (\d+)$", text, flags=re.M))
        assert table[key] == e["answer"] and len(table) == retrieval.pairs_for_context(context)


def test_generators_are_deterministic():
    assert retrieval.retrieval_example(1024, 7) == retrieval.retrieval_example(1024, 7)
    assert retrieval.retrieval_example(1024, 7) != retrieval.retrieval_example(1024, 8)
    assert cross_chunk.cross_chunk_example(4) == cross_chunk.cross_chunk_example(4)
    a = retrieval.training_retrieval_doc(random.Random(5), 800)
    assert a == retrieval.training_retrieval_doc(random.Random(5), 800)
    b = cross_chunk.training_program_doc(random.Random(5), 800)
    assert b == cross_chunk.training_program_doc(random.Random(5), 800)


def test_retrieval_keys_never_cross_splits():
    eval_keys = set()
    for e in retrieval.retrieval_examples(2048, 4):
        eval_keys |= set(re.findall(r"^(\w+): \d+$", TOK.decode(e["prompt"]), flags=re.M))
    train_keys = set(re.findall(r"^(\w+): \d+$",
                                retrieval.training_retrieval_doc(random.Random(0), 20000), flags=re.M))
    assert eval_keys and train_keys and not eval_keys & train_keys
    assert {split_of(k) for k in eval_keys} == {"eval"}
    assert {split_of(k) for k in train_keys} == {"train"}


def test_seed_streams_differ_between_splits():
    assert seeded_rng("train", 0, 1).random() != seeded_rng("eval", 0, 1).random()
    with pytest.raises(ValueError):
        seeded_rng("test", 0)


def test_training_program_asserts_match_the_interpreter():
    doc = cross_chunk.training_program_doc(random.Random(11), 4000)
    _, asserts = run_program(doc)
    assert len(asserts) > 50
    assert all(got == want for got, want in asserts)


@pytest.mark.parametrize("index", range(6))
def test_chain_example_needs_the_value_from_an_earlier_chunk(index):
    ex = cross_chunk.cross_chunk_example(index, kind="chain")
    texts = [TOK.decode(c) for c in ex["chunks"]]
    question = TOK.decode(ex["question"])
    target = re.fullmatch(r"assert (\w+) == ", question)[1]
    env, _ = run_program("".join(texts))
    assert env[target] == ex["answer"] != ex["trap"]
    # The target is defined once, as a copy, and its source's only earlier value lives in
    # an earlier chunk: the answer cannot be read off the copy's own chunk.
    (copy_chunk, source), = [(i, m) for i, t in enumerate(texts)
                             for m in re.findall(rf"^{target} = (\w+)$", t, flags=re.M)]
    assert not source.isdigit()
    before = "".join(texts[:copy_chunk]) + texts[copy_chunk].split(f"{target} = {source}\n")[0]
    assert re.findall(rf"^{source} = (\w+)$", before, flags=re.M) == [ex["answer"]]
    assert f"{source} = {ex['answer']}\n" not in texts[copy_chunk]
    assert env[source] == ex["trap"]  # resolving at question time gives the stale value
    assert "assert" not in "".join(texts)
    assert ex["chunks"][0][0] == TOK.bos_id and all(TOK.bos_id not in c for c in ex["chunks"][1:])


def test_direct_example_is_answerable_inside_one_chunk():
    ex = cross_chunk.cross_chunk_example(0, kind="direct")
    target = re.fullmatch(r"assert (\w+) == ", TOK.decode(ex["question"]))[1]
    owners = [i for i, c in enumerate(ex["chunks"]) if f"\n{target} = " in TOK.decode(c)]
    assert len(owners) == 1
    assert run_program("".join(TOK.decode(c) for c in ex["chunks"]))[0][target] == ex["answer"]


def test_heldout_split_follows_the_module_including_its_tests():
    assert module_key("json/decoder.py") == "json"
    assert module_key("test/test_json/test_fail.py") == "json"
    assert module_key("test/test_typing.py") == "typing"
    assert is_heldout("typing.py") == is_heldout("test/test_typing.py")


def test_mixer_emits_bos_then_full_windows():
    text = np.frombuffer(b"x = 1\n" * 2000, dtype=np.uint8)
    mixer = SequenceMixer(text, 512)
    rng = random.Random(0)
    seen = set()
    for _ in range(30):
        ids, source = mixer.sequence(rng)
        seen.add(source)
        assert ids.shape == (512,) and ids[0] == TOK.bos_id and ids.max() < TOK.vocab_size
    assert seen == {0, 1, 2}
