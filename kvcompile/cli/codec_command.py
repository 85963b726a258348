"""`kvcompile codec encode|decode|inspect`: the KV codec on a prompt's saved KV, with sizes per layer.

    kvcompile run DIR --prompt "..." --save-kv prompt.kv.safetensors
    kvcompile codec encode prompt.kv.safetensors --level 2        # -> prompt.kv.kvcb + table
    kvcompile codec inspect prompt.kv.kvcb                        # header + the same table
    kvcompile codec decode prompt.kv.kvcb -o decoded.safetensors  # back to a KV file

The table gives each layer's bytes (K and V together, over all chunks) against the same KV in
fp16 and in 8-bit (int8 per element + an fp32 scale per (layer, token), K and V: the
baseline docs/CODEC.md compares with). A missing, truncated or foreign input file is one line
and exit code 3 (kvcompile.errors).
"""
from __future__ import annotations

import io
from pathlib import Path

from kvcompile.errors import InputError, UsageError


def read_blob(path: Path) -> bytes:
    from kvcompile.codec import BitstreamError

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BitstreamError(f"KV bitstream {path} does not exist") from None
    except OSError as error:
        raise BitstreamError(f"cannot read KV bitstream {path}: {error.strerror or error}") from None


def write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.writing")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)  # a half-written file never takes the name
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None


def output_path(given, source: Path, suffix: str) -> Path:
    path = Path(given) if given else source.with_name(source.name.split(".")[0] + suffix)
    if path.resolve() == source.resolve():
        raise UsageError(f"-o {path} would overwrite the input")
    return path


# --- sizes ------------------------------------------------------------------------------------
def layer_bytes(blob: bytes):
    """-> (header, [bytes of layer l in the chunks, K and V]): each layer's rANS words, plus its
    share of each chunk's fixed part (scales, tables, stream ends: the same size for every
    layer); the container's header and padding are what is left of len(blob)."""
    import numpy as np

    import kvcompile.codec as codec
    from kvcompile.codec import chunk as chunk_codec

    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    per_layer = np.zeros(header.layers, dtype=np.int64)
    streams = header.channels // header.group
    for index, data in codec.iter_chunks(stream, header):
        ends = np.concatenate([[0], chunk_codec.parse_chunk(header, index, data).ends])
        words = np.diff(ends).reshape(2, header.layers, streams).sum(axis=(0, 2))  # K and V of each layer
        fixed = chunk_codec.Layout.of(header, header.chunk_span(index)[1]).words
        per_layer += 2 * words + fixed // header.layers
    return header, per_layer.tolist()


def fp16_bytes(header) -> int:
    """One layer's K and V in fp16."""
    return 2 * header.kv_heads * header.tokens * header.head_dim * 2


def eight_bit_bytes(header) -> int:
    """One layer's K and V as int8 + an fp32 scale per (layer, token)."""
    return 2 * (header.kv_heads * header.tokens * header.head_dim + 4 * header.tokens)


def size_table(out, header, per_layer: list, total: int, title: str) -> dict:
    from rich.table import Table

    fp16, eight = fp16_bytes(header), eight_bit_bytes(header)
    out.print(title, soft_wrap=True)
    table = Table()
    for column in ("layer", "bytes", "vs fp16", "vs 8-bit", "bits/value"):
        table.add_column(column, justify="right")
    values_per_layer = 2 * header.kv_heads * header.tokens * header.head_dim
    for layer, size in enumerate(per_layer):
        table.add_row(str(layer), f"{size:,}", f"{fp16 / size:.2f}×", f"{eight / size:.2f}×",
                      f"{8 * size / values_per_layer:.2f}")
    other = total - sum(per_layer)
    table.add_row("header+pad", f"{other:,}", "", "", "")
    layers = header.layers
    table.add_row("total", f"{total:,}", f"{layers * fp16 / total:.2f}×", f"{layers * eight / total:.2f}×",
                  f"{8 * total / (layers * values_per_layer):.2f}")
    out.print(table)
    return {"bytes": total, "fp16_bytes": layers * fp16, "eight_bit_bytes": layers * eight,
            "per_layer": per_layer}


def describe(header) -> str:
    return (f"level {header.level}, {header.layers} layers × {header.kv_heads} KV heads × {header.tokens} tokens × "
            f"head_dim {header.head_dim} ({header.dtype}), {header.chunks} chunk(s) of ≤ {header.chunk_tokens} "
            f"tokens, fingerprint {header.fingerprint or '(none)'}")


# --- the three commands ---------------------------------------------------------------------
def cmd_encode(args, out) -> int:
    import time

    import kvcompile.codec as codec
    from kvcompile.codec.saved_kv import SavedKV

    source = Path(args.kv)
    saved = SavedKV.load(source)
    target = output_path(args.output, source, ".kvcb")
    start = time.perf_counter()
    blob = codec.encode((saved.keys, saved.values), level=args.level, chunk_tokens=args.chunk_tokens,
                        fingerprint=saved.fingerprint)
    seconds = time.perf_counter() - start
    write_bytes(target, blob)
    header, per_layer = layer_bytes(blob)
    size_table(out, header, per_layer, len(blob), f"{target}: {describe(header)}")
    out.print(f"encoded {source} to {target} ({len(blob):,} bytes) in {seconds:.2f} s")
    return 0


def cmd_decode(args, out) -> int:
    import time

    import kvcompile.codec as codec
    from kvcompile.codec.saved_kv import SavedKV

    source = Path(args.blob)
    blob = read_blob(source)
    header = codec.read_header(blob)
    target = output_path(args.output, source, ".decoded.safetensors")
    start = time.perf_counter()
    keys, values = codec.decode(blob)
    seconds = time.perf_counter() - start
    SavedKV(keys, values, header.fingerprint, None, {"decoded_from": source.name, "level": header.level}).save(target)
    out.print(f"decoded {source} ({describe(header)}) to {target} in {seconds:.2f} s")
    return 0


def cmd_inspect(args, out) -> int:
    source = Path(args.blob)
    blob = read_blob(source)
    header, per_layer = layer_bytes(blob)
    size_table(out, header, per_layer, len(blob), f"{source}: {describe(header)}")
    return 0


COMMANDS = {"encode": cmd_encode, "decode": cmd_decode, "inspect": cmd_inspect}


def add_codec_parser(sub, sub_parser, positive_int) -> None:
    """The `codec` command and its three subcommands (called from cli/main.py)."""
    codec_parser = sub_parser(sub, "codec", "compress a saved KV cache (kvcompile run --save-kv) and back")
    actions = codec_parser.add_subparsers(dest="codec_command", required=True, parser_class=type(codec_parser))
    encode = sub_parser(actions, "encode", "KV file (safetensors) -> bitstream, with sizes per layer")
    encode.add_argument("kv", help="a KV file written by `kvcompile run --save-kv` or `codec decode`")
    encode.add_argument("--level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                        help="0 lossless for 8-bit input … 3 aggressive; 4 (default) between 1 and 2 in size "
                        "(docs/CODEC.md)")
    encode.add_argument("--chunk-tokens", type=positive_int, default=256, help="tokens per independent chunk")
    encode.add_argument("-o", "--output", help="bitstream file (default: the KV file's name with .kvcb)")
    decode = sub_parser(actions, "decode", "bitstream -> KV file (safetensors)")
    decode.add_argument("blob", help="a bitstream written by `kvcompile codec encode`")
    decode.add_argument("-o", "--output", help="KV file (default NAME.decoded.safetensors)")
    inspect = sub_parser(actions, "inspect", "a bitstream's header and sizes per layer")
    inspect.add_argument("blob", help="a bitstream written by `kvcompile codec encode`")
