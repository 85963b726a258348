"""`kvcompile store ls|put|get|rm|stats|gc --store URL`: look after a KV store from the shell.

put  stores a chunk cache file (ChunkCache.save) piece by piece, raw or --codec LEVEL; prints its key
get  a cache key -> a chunk cache file; a piece key (…/INDEX) -> that entry's value bytes
rm   cache keys (all their pieces) or piece keys;  ls  entries (with --prefix);  stats;  gc [--verify]
The integrity key, if the store uses one, comes from --integrity-key-file or $KVCOMPILE_STORE_KEY
(never from the command line, where other users could read it).
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from kvcompile.errors import InputError, UsageError

STORE_ENV, KEY_ENV = "KVCOMPILE_STORE", "KVCOMPILE_STORE_KEY"


def add_store_parser(sub, sub_parser) -> None:
    from kvcompile.store import DEFAULT_URL

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=os.environ.get(STORE_ENV, DEFAULT_URL),
                        help=f"file://PATH, redis://[user:pw@]host:port/db or rediss://… (default ${STORE_ENV} or "
                             f"{DEFAULT_URL}); options as ?max_bytes=20G&ttl=1d")
    common.add_argument("--integrity-key-file", help=f"file holding the HMAC secret (default ${KEY_ENV})")
    store = sub_parser(sub, "store", "the KV store: chunk caches and KV bitstreams")
    verbs = store.add_subparsers(dest="store_command", required=True, parser_class=type(store))
    ls = sub_parser(verbs, "ls", "list entries", parents=[common])
    ls.add_argument("--prefix", default="", help="only keys starting with this")
    put = sub_parser(verbs, "put", "store a chunk cache file; prints its key", parents=[common])
    put.add_argument("file", help="a chunk cache (safetensors written by ChunkCache.save)")
    put.add_argument("--codec", type=int, metavar="LEVEL", help="store codec bitstreams of this level (default: raw)")
    put.add_argument("--ttl", help="seconds (or 30m, 1h, 7d) the entries live")
    get = sub_parser(verbs, "get", "fetch a chunk cache (or one piece's value) to a file", parents=[common])
    get.add_argument("key", help="a key printed by `put` or `ls`")
    get.add_argument("-o", "--output", required=True, help="file to write")
    rm = sub_parser(verbs, "rm", "remove entries", parents=[common])
    rm.add_argument("keys", nargs="+", help="cache keys (every piece) or piece keys")
    sub_parser(verbs, "stats", "entries, bytes, budget", parents=[common])
    gc = sub_parser(verbs, "gc", "drop abandoned writes and expired entries, evict to the budget", parents=[common])
    gc.add_argument("--verify", action="store_true", help="also read every entry and drop those failing checks")


def open_from(args):
    from kvcompile.store import open_store

    secret = os.environ.get(KEY_ENV)
    if args.integrity_key_file:
        try:
            secret = Path(args.integrity_key_file).read_bytes().strip()
        except OSError as error:
            raise UsageError(f"cannot read the integrity key file {args.integrity_key_file}: "
                             f"{error.strerror or error}") from None
    return open_store(args.store, integrity_key=secret)


def cmd_store(args, out) -> int:
    with open_from(args) as store:
        return VERBS[args.store_command](args, store, out)


def when(seconds) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def do_ls(args, store, out) -> int:
    from rich.table import Table

    infos = store.list(args.prefix)
    table = Table("key", "bytes", "layout", "tokens", "created", "last used", box=None)
    for info in infos:
        meta = info.meta
        positions = meta.get("positions")
        table.add_row(info.key, str(info.bytes), meta.get("layout", "-"),
                      f"{positions[0]}..{positions[1]}" if positions else "-", when(meta.get("created")),
                      when(info.last_used))
    out.print(table)
    out.print(f"{len(infos)} entr{'y' if len(infos) == 1 else 'ies'}, {sum(i.bytes for i in infos)} bytes")
    return 0


def do_put(args, store, out) -> int:
    from kvcompile.fusion.chunks import ChunkCache
    from kvcompile.store import put_chunk_cache
    from kvcompile.store import TIME_UNITS, parse_amount

    path = Path(args.file)
    if not path.is_file():
        raise InputError(f"no chunk cache file {path}")
    chunk = ChunkCache.load(path)
    ttl = parse_amount(args.ttl, TIME_UNITS, "--ttl") if args.ttl else None
    key = put_chunk_cache(store, chunk, args.codec, ttl=ttl)
    out.print(str(key), soft_wrap=True)
    return 0


def do_get(args, store, out) -> int:
    from kvcompile.store import CacheKey, get_chunk_cache

    key, piece = CacheKey.parse(args.key)
    if piece is not None:
        value = store.get(args.key)
        if value is None:
            raise InputError(f"no entry {args.key} in {store.url}")
        Path(args.output).write_bytes(value)
        out.print(f"wrote {len(value)} bytes to {args.output}")
        return 0
    chunk = get_chunk_cache(store, key)
    if chunk is None:
        raise InputError(f"{key} is not (wholly) in {store.url}: some piece is missing")
    chunk.save(args.output)
    out.print(f"wrote the chunk cache ({chunk.length} tokens, {len(chunk.keys)} layers) to {args.output}")
    return 0


def do_rm(args, store, out) -> int:
    from kvcompile.store import CacheKey

    removed = 0
    for text in args.keys:
        key, piece = CacheKey.parse(text) if text.startswith("kvc1/") else (None, None)
        targets = key.piece_keys() if key is not None and piece is None else [text]
        removed += sum(store.delete(target) for target in targets)
    out.print(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")
    return 0


def do_stats(args, store, out) -> int:
    for name, value in store.stats().items():
        out.print(f"{name:32} {when(value) if name.endswith('_use') else value}")
    return 0


def do_gc(args, store, out) -> int:
    removed = store.gc(verify=args.verify)
    out.print(", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in removed.items()))
    return 0


VERBS = {"ls": do_ls, "put": do_put, "get": do_get, "rm": do_rm, "stats": do_stats, "gc": do_gc}
