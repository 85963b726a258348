"""load_model: local checkpoints load with SDPA; broken ones fail with one clear line."""
from __future__ import annotations

import json

import pytest
import torch

from kvcompile.frontend.loading import LoadError, load_model
from kvcompile.frontend.tiny_models import tiny_model


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_model("qwen2")
    model.save_pretrained(folder)
    return folder, model


def test_local_checkpoint_loads_with_sdpa(saved_checkpoint):
    folder, original = saved_checkpoint
    model = load_model(folder)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits)


def test_missing_folder(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_config(saved_checkpoint, tmp_path):
    folder, _ = saved_checkpoint
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_model(tmp_path)


def test_truncated_weights(saved_checkpoint, tmp_path):
    folder, _ = saved_checkpoint
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LoadError, match="corrupt"):
        load_model(tmp_path)


def test_unknown_bundled_name_is_treated_as_missing_folder():
    with pytest.raises(LoadError, match="bundled"):
        load_model("no-such-model")


def test_config_only_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_model("llama").config.to_dict()))
    with pytest.raises(LoadError, match="no weight files"):
        load_model(tmp_path)


def test_bundled_reference_model_loads_by_name():
    from kvcompile.frontend.loading import bundled_model_dir, load_model

    assert (bundled_model_dir("reference") / "config.json").is_file()
    model = load_model("reference")
    assert model.config._kvcompile_source == "reference" and not model.training
