"""Small-sample quality smoke check of the shipped model (CPU, ~1 minute).

Thresholds sit well below the full-sample numbers in docs/REFERENCE_MODEL.md, so a broken
model, tokenizer or task fails them while sampling noise does not.
"""
import pytest
import torch

from kvcompile.eval import HFRunner, evaluate
from kvcompile.reference import WEIGHTS_DIR

pytestmark = pytest.mark.slow  # ~2 min on the shared 2-core CPU machine (~90 prompts)


@pytest.fixture(scope="module")
def report():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return evaluate(HFRunner(model), count=12, ppl_windows=2, context_lengths=(512, 2048))


def test_heldout_bits_per_byte(report):
    assert report["perplexity"]["bpb"] < 2.0  # uniform bytes would be 8


def test_retrieval_at_512_and_2048(report):
    assert report["retrieval"]["512"] >= 0.9
    assert report["retrieval"]["2048"] >= 0.9


def test_cross_chunk_needs_fusion(report):
    chain, direct = report["cross_chunk"]["chain"], report["cross_chunk"]["direct"]
    assert chain["full_prefill"] >= 0.75
    assert chain["full_reuse"] <= chain["full_prefill"] - 0.4
    assert direct["full_reuse"] >= 0.75  # reuse loses only what must flow between chunks
