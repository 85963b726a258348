"""Parsing and cross-checking the cache options shared by export, inspect and eval.

Conflicting or ignored options are errors, not silence: kcache options with `--cache full`,
`--full-layers` that leaves no layer to kcache, a `--topn` the model's context can never reach.
"""
from __future__ import annotations

import argparse

from kvcompile.core.modes import CacheKind, SelectMode
from kvcompile.errors import UsageError

KCACHE_FLAGS = {"topn": "--topn", "select": "--select", "full_layers": "--full-layers"}


def parse_topn(text: str):
    """argparse type: an int ≥ 1 (positions) or a fraction in (0, 1] of the context."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an int ≥ 1 or a fraction in (0, 1]") from None
    if isinstance(value, float) and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"invalid fraction {text}: a fractional topn lies in (0, 1]")
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text}: topn must be ≥ 1")
    return value


def number(text: str, convert, allowed, rule: str, kind: str = "an int"):
    """argparse type helper: `convert(text)` when `allowed(value)`, else one clear line."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {kind} {rule}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"invalid value {text}: must be {rule}")
    return value


def non_negative_int(text: str) -> int:
    return number(text, int, lambda v: v >= 0, "≥ 0")


def positive_int(text: str) -> int:
    return number(text, int, lambda v: v >= 1, "≥ 1")


def ratio_in_unit(text: str) -> float:
    return number(text, float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]", kind="a number")


def add_cache_options(parser) -> None:
    group = parser.add_argument_group("cache")
    group.add_argument("--cache", choices=CacheKind.names(), default=CacheKind.FULL.value, help="KV-cache scheme")
    group.add_argument("--topn", type=parse_topn, help="kcache: positions kept (int), or fraction of the context "
                                                       "(float in (0, 1]); default 512")
    group.add_argument("--select", choices=SelectMode.names(), help="kcache: one selection per KV head or per layer; "
                                                                    "default head")
    group.add_argument("--full-layers", type=non_negative_int, help="kcache: first layers that keep V on the device; "
                                                                    "default 0")


def cache_config_from(args):
    """A CacheConfig from the flags; kcache flags with another cache kind are an error."""
    from kvcompile.core.config import CacheConfig

    given = {field: getattr(args, field) for field in KCACHE_FLAGS if getattr(args, field, None) is not None}
    if given and args.cache != CacheKind.KCACHE.value:
        flags = ", ".join(KCACHE_FLAGS[f] for f in given)
        raise UsageError(f"{flags} appl{'ies' if len(given) == 1 else 'y'} to --cache kcache only (the cache is {args.cache})")
    return CacheConfig(kind=args.cache, **given)


def check_against_model(config, model) -> None:
    """Options the model's size makes meaningless: refused before tracing."""
    if config.kind is not CacheKind.KCACHE:
        return
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None and config.full_layers >= layers:
        raise UsageError(f"--full-layers {config.full_layers} keeps V on the device in all {layers} layers: "
                         "no layer would use kcache (use --cache full)")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and isinstance(config.topn, int) and config.topn >= context:
        raise UsageError(f"--topn {config.topn} ≥ the model's context of {context} positions: every position "
                         "would always be kept (that is the full cache: use --cache full)")
