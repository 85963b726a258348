"""Sampling draws what transformers' generate draws: same seed, same options, same tokens."""
from __future__ import annotations

import pytest
import torch

from kvcompile.errors import InputValidationError
from kvcompile.runtime.sampling import Sampling
from tiny_models import compiled_tiny


@pytest.mark.parametrize("options", [
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.5),
    dict(top_p=0.5, top_k=0),
    dict(top_k=5),
])
def test_sampling_matches_transformers(options):
    model, compiled = compiled_tiny("llama")
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    torch.manual_seed(5)
    expected = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=20, pad_token_id=0, **options)
    got = compiled.generate(ids, mask, do_sample=True, max_new_tokens=20, seed=5, pad_token_id=0, **options)
    assert torch.equal(got, expected)


def test_same_seed_same_tokens_other_seed_other_tokens():
    _, compiled = compiled_tiny("llama")
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(2))
    run = lambda seed: compiled.generate(ids, do_sample=True, temperature=2.0, max_new_tokens=24, seed=seed)  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_options_are_refused(options, message):
    with pytest.raises(InputValidationError, match=message):
        Sampling(do_sample=True, **options)
