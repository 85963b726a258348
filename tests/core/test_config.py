"""CacheConfig: one options group per technique, enums for modes, the keyword shortcut."""
from __future__ import annotations

import pytest

from kvcompile.core.config import CacheConfig, ConfigError, KCacheOptions
from kvcompile.core.modes import CacheKind, SelectMode


def test_options_group_and_shortcut_are_the_same_config():
    grouped = CacheConfig(kind="kcache", kcache=KCacheOptions(topn=128, select="layer"))
    shortcut = CacheConfig(kind="kcache", topn=128, select="layer")
    assert grouped == shortcut
    assert grouped.kind is CacheKind.KCACHE and grouped.select is SelectMode.LAYER
    assert grouped.kcache.topn == grouped.topn == 128


def test_round_trips_through_a_manifest_dict_and_reads_the_old_flat_form():
    config = CacheConfig(kind="kcache", topn=0.25, full_layers=1, renormalize=True)
    assert CacheConfig.from_dict(config.to_dict()) == config
    flat = {"kind": "kcache", "topn": 0.25, "select": "head", "full_layers": 1, "renormalize": True}
    assert CacheConfig.from_dict(flat) == config


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="paged"), "unknown cache kind 'paged'"),
    (dict(kind="kcache", select="row"), "unknown selection mode 'row'"),
    (dict(kind="kcache", topn=1.5), "fractional topn"),
    (dict(kind="kcache", full_layers=-1), "full_layers"),
    (dict(kind="kcache", top_n=3), "unknown CacheConfig option"),
    (dict(kind="kcache", kcache=KCacheOptions(), topn=3), "not both"),
])
def test_bad_values_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**kwargs)


def test_select_mode_code_is_the_c_abi_value():
    assert [SelectMode.HEAD.code, SelectMode.LAYER.code] == [0, 1]


def test_c_header_select_enum_matches_select_mode():
    import re
    from pathlib import Path

    import kvcompile.plugins

    header = (Path(kvcompile.plugins.__file__).parent / "csrc" / "kvcompile_kernels.h").read_text()
    found = dict(re.findall(r"KVC_SELECT_(\w+) = (\d+)", header))
    assert {name.lower(): int(code) for name, code in found.items()} == {m.value: m.code for m in SelectMode}
