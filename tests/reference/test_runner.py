"""HFRunner: greedy decoding and the fused modes agree with independent computations."""
import pytest
import torch
from transformers import LlamaForCausalLM

from kvcompile.eval import HFRunner
from kvcompile.reference.architecture import reference_config


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(reference_config("tiny"), attn_implementation="sdpa")
    return HFRunner(model.eval())


CHUNKS = [[256, 10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]]
QUESTION = [40, 41]


def block_mask(chunks, question_len):
    """Additive 4D mask: chunk tokens see their own chunk causally, the question sees all."""
    total = sum(map(len, chunks)) + question_len
    allowed = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for chunk in chunks:
        n = len(chunk)
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    allowed[start:] = torch.ones(total, total, dtype=torch.bool).tril()[start:]
    return torch.where(allowed, 0.0, float("-inf"))[None, None]


def test_greedy_matches_argmax_of_a_full_forward(runner):
    prompt = [256, 5, 6, 7, 8]
    new = runner.greedy([prompt], 4)[0]
    ids = list(prompt)
    for _ in range(4):
        ids.append(int(runner.logits(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt):]


def test_greedy_batches_mixed_lengths_without_changing_results(runner):
    prompts = [[256, 1, 2, 3], [256, 9, 8], [256, 4, 5, 6]]
    together = runner.greedy(prompts, 3)
    alone = [runner.greedy([p], 3)[0] for p in prompts]
    assert together == alone


def test_full_reuse_equals_full_prefill_for_one_chunk(runner):
    chunk = [sum(CHUNKS, [])]
    reuse = runner.question_logits(chunk, QUESTION, "full_reuse")
    prefill = runner.question_logits(chunk, QUESTION, "full_prefill")
    torch.testing.assert_close(reuse, prefill, atol=1e-5, rtol=1e-5)
    assert runner.greedy_fused(chunk, QUESTION, 3, "full_reuse") == \
        runner.greedy_fused(chunk, QUESTION, 3, "full_prefill")


def test_full_reuse_equals_a_block_diagonal_attention_mask(runner):
    ids = torch.tensor([sum(CHUNKS, []) + QUESTION])
    with torch.no_grad():
        masked = runner.model(input_ids=ids, attention_mask=block_mask(CHUNKS, len(QUESTION))).logits
    reuse = runner.question_logits(CHUNKS, QUESTION, "full_reuse")
    torch.testing.assert_close(reuse, masked[0, -len(QUESTION):].float(), atol=1e-5, rtol=1e-5)
    prefill = runner.question_logits(CHUNKS, QUESTION, "full_prefill")
    assert (reuse - prefill).abs().max() > 1e-3  # several chunks: the modes really differ


def test_unknown_mode_is_refused(runner):
    with pytest.raises(ValueError):
        runner.greedy_fused(CHUNKS, QUESTION, 1, "blend-ish")
