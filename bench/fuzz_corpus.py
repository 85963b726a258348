"""Fuzz the KV codec's public decoder with mutated and truncated bitstreams; write a corpus.

Two families of mutations, both seeded (the same --seed gives the same corpus):
  raw       bytes flipped, overwritten, inserted, deleted, truncated, appended, regions copied:
            what a broken disk or network produces. The header and chunk CRC-32s must catch
            every one: each must raise BitstreamError, or (a no-op mutation) decode to the original.
  resealed  the same mutations inside one chunk, or edits of the header's JSON fields (shape,
            level, lengths, alphabet), with every checksum recomputed afterwards: what an
            adversary or a buggy encoder produces. The CRCs cannot help, so these exercise the
            parser's own bounds checks. Each must raise BitstreamError or decode to tensors of the
            header's shape; the ones that decode are the "survivors".
Any other exception, or a decode slower than --timeout-s, is a finding.

    python bench/fuzz_corpus.py --count 10000 --out fuzz_corpus/
writes fuzz_corpus/NNNNN.kvcb (the survivors: a GPU decoder must read them without going out of
bounds), the unmutated seed_levelN.kvcb, fuzz_corpus/index.json (for every file: its family,
mutation, and whether it decodes to the original), and prints the counts. On the GPU machine:
    compute-sanitizer --tool memcheck python bench/fuzz_corpus.py --replay fuzz_corpus/ --device cuda
decodes each file there and on the CPU and reports where the two disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

def seed_kv(seed: int = 0, layers: int = 2, heads: int = 1, tokens: int = 40, dim: int = 8):
    """Small K/V [layers, kv_heads, tokens, head_dim]: a decode takes ~1 ms on one CPU core."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, tokens, dim, generator=generator)
    return keys.half(), (torch.randn(layers, heads, tokens, dim, generator=generator) * 2).half()


def seed_blobs(levels=None, chunk_tokens: int = 16):
    """One bitstream per codec level (3 chunks each, the last one short)."""
    import kvcompile.codec as codec

    levels = codec.LEVELS if levels is None else levels
    return {level: codec.encode(seed_kv(level), level=level, chunk_tokens=chunk_tokens, fingerprint="fuzz")
            for level in levels}


# --- containers: split and reseal, through the codec's own header type ----------------------
def split(blob: bytes):
    """-> (Header, [chunk bytes]) of a well-formed bitstream."""
    import io

    import kvcompile.codec as codec

    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    return header, [data for _, data in codec.iter_chunks(stream, header)]


def reseal(header, chunks) -> bytes:
    """A container whose chunk lengths and every checksum are correct again."""
    from kvcompile.codec import bitstream

    return bitstream.write(dataclasses.replace(header), list(chunks))


# --- mutations ---------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> tuple:
    """One random byte-level mutation -> (new bytes, description)."""
    data = bytearray(data)
    n = len(data)
    kind = rng.choice(["flip", "set", "insert", "delete", "truncate", "append", "copy", "zero_run", "ff_run"])
    at = rng.randrange(max(n, 1))
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == "set":
        data[at] = rng.randrange(256)
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 64])))
    elif kind == "delete":
        del data[at: at + rng.choice([1, 2, 4, 64])]
    elif kind == "truncate":
        del data[at:]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 100])))
    elif kind == "copy":
        length = rng.choice([2, 8, 32])
        source = rng.randrange(max(n - length, 1))
        data[at: at + length] = data[source: source + length]
    else:
        value, length = (0 if kind == "zero_run" else 0xFF), rng.choice([2, 4, 16])
        data[at: at + length] = bytes([value]) * len(data[at: at + length])
    return bytes(data), f"{kind}@{at}"


# header fields and the largest value their bitstream field holds (docs/CODEC.md's byte table)
HEADER_FIELDS = {"layers": 2**16 - 1, "kv_heads": 2**16 - 1, "head_dim": 2**16 - 1, "group": 2**16 - 1,
                 "level": 255, "tokens": 2**32 - 1, "chunk_tokens": 2**32 - 1}


def odd_value(value: int, largest: int, rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 7, 255, largest, largest - 1, (largest + 1) // 2, value + 1, value - 1,
                       value * 2, value // 2, rng.randrange(largest + 1)]) % (largest + 1)


def mutate_header(header, chunks, rng: random.Random) -> tuple:
    """Edit one header field (in its field's range) -> (header, chunks, description); the
    chunk table keeps its lengths and CRCs unless the edit is to them."""
    header = dataclasses.replace(header, chunk_bytes=list(header.chunk_bytes), chunk_crcs=list(header.chunk_crcs))
    chunks = list(chunks)
    kind = rng.random()
    if kind < 0.3:
        index = rng.randrange(header.chunks)
        header.chunk_bytes[index] = odd_value(header.chunk_bytes[index], 2**32 - 1, rng)
        return header, chunks, f"header.chunk_bytes[{index}]={header.chunk_bytes[index]}"
    if kind < 0.4:  # a chunk row dropped or duplicated, with its bytes
        index = rng.randrange(header.chunks)
        if rng.random() < 0.5:
            del header.chunk_bytes[index], header.chunk_crcs[index], chunks[index]
            return header, chunks, f"header: chunk {index} removed"
        header.chunk_bytes.insert(index, header.chunk_bytes[index])
        header.chunk_crcs.insert(index, header.chunk_crcs[index])
        chunks.insert(index, chunks[index])
        return header, chunks, f"header: chunk {index} duplicated"
    if kind < 0.45:
        header.dtype = rng.choice([d for d in ("float32", "float16", "bfloat16") if d != header.dtype])
        return header, chunks, f"header.dtype={header.dtype}"
    name = rng.choice(sorted(HEADER_FIELDS))
    setattr(header, name, odd_value(getattr(header, name), HEADER_FIELDS[name], rng))
    return header, chunks, f"header.{name}={getattr(header, name)}"


def mutants(blobs: dict, count: int, seed: int):
    """Yield (family, description, level, bytes) for `count` mutations: half raw, a third of the
    rest resealed header edits, the others resealed chunk edits."""
    rng = random.Random(seed)
    levels = sorted(blobs)
    parts = {level: split(blob) for level, blob in blobs.items()}
    for index in range(count):
        level = levels[index % len(levels)]
        if index % 2 == 0:
            data, what = mutate_bytes(blobs[level], rng)
            yield "raw", what, level, data
            continue
        header, chunks = parts[level]
        if rng.random() < 0.3:
            header, chunks, what = mutate_header(header, chunks, rng)
            yield "resealed.header", what, level, header.to_bytes() + b"".join(chunks)
        else:
            chunks = list(chunks)
            target = rng.randrange(len(chunks))
            chunks[target], what = mutate_bytes(chunks[target], rng)
            yield "resealed.chunk", f"chunk{target}.{what}", level, reseal(header, chunks)


# --- running them ------------------------------------------------------------------------------
def decode_one(blob: bytes, originals: dict, level: int, timeout_s: float) -> dict:
    """-> {"outcome": "error" | "same" | "differs", ...}; raises on a finding (any other
    exception, a slow decode, or tensors of the wrong shape)."""
    import kvcompile.codec as codec

    start = time.perf_counter()
    try:
        keys, values = codec.decode(blob)
    except codec.BitstreamError as error:
        outcome = {"outcome": "error", "message": str(error)}
    else:
        reference = originals[level]
        outcome = {"outcome": "same" if (keys.shape == reference[0].shape and torch.equal(keys, reference[0])
                                         and torch.equal(values, reference[1])) else "differs",
                   "shape": list(keys.shape),
                   "finite": bool(torch.isfinite(keys).all() and torch.isfinite(values).all())}
        if keys.shape != values.shape or keys.dim() != 4:
            raise AssertionError(f"decoded K/V of shapes {tuple(keys.shape)} / {tuple(values.shape)}")
    elapsed = time.perf_counter() - start
    if elapsed > timeout_s:
        raise AssertionError(f"decode took {elapsed:.2f} s (> {timeout_s} s)")
    return outcome


def run(count: int, seed: int, timeout_s: float = 2.0, out=None, families=("raw", "resealed"),
        keep_errors: bool = False) -> dict:
    """Decode `count` mutants; -> counts per outcome, survivors, and findings (one example per
    kind of finding: exception type and family)."""
    import kvcompile.codec as codec

    torch.set_num_threads(1)
    blobs = seed_blobs()
    originals = {level: codec.decode(blob) for level, blob in blobs.items()}
    tally: dict = {}
    survivors, findings = [], {}
    start = time.perf_counter()
    for index, (family, what, level, data) in enumerate(mutants(blobs, count, seed)):
        if not family.startswith(tuple(families)):
            continue
        try:
            result = decode_one(data, originals, level, timeout_s)
            if family.startswith("raw") and result["outcome"] == "differs":
                raise AssertionError("a raw mutation decoded silently to different tensors")
        except Exception as error:  # a finding: anything but the codec's own error
            signature = f"{family}: {type(error).__name__}"
            findings.setdefault(signature, {"count": 0, "example": f"mutation {index} (level {level}, {what}): "
                                            f"{str(error).splitlines()[0][:200]}"})["count"] += 1
            continue
        key = f"{family}:{result['outcome']}"
        tally[key] = tally.get(key, 0) + 1
        if result["outcome"] != "error" or (keep_errors and family == "resealed.chunk"):
            survivors.append({"index": index, "family": family, "level": level, "mutation": what,
                              "outcome": result["outcome"], "finite": result.get("finite"), "data": data})
    seconds = time.perf_counter() - start
    if out is not None:
        write_corpus(Path(out), survivors, blobs, seed)
    return {"count": count, "seed": seed, "seconds": round(seconds, 2), "tally": dict(sorted(tally.items())),
            "survivors": sum(item["outcome"] != "error" for item in survivors), "corpus": len(survivors),
            "nonfinite": sum(item["outcome"] != "error" and item["finite"] is False for item in survivors),
            "findings": findings}


def write_corpus(folder: Path, survivors: list, blobs: dict, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for level, blob in blobs.items():  # the unmutated seeds too: a decoder's baseline
        (folder / f"seed_level{level}.kvcb").write_bytes(blob)
        index.append({"file": f"seed_level{level}.kvcb", "family": "seed", "level": level, "outcome": "same"})
    for item in survivors:
        name = f"{item['index']:05d}.kvcb"
        (folder / name).write_bytes(item["data"])
        index.append({"file": name, **{k: v for k, v in item.items() if k != "data"}})
    (folder / "index.json").write_text(json.dumps({"seed": seed, "files": index}, indent=1) + "\n")


def decode_through_op(blob: bytes, device: str):
    """The header and CRCs on the CPU, the chunks through the kv_decode op on `device` (on CUDA
    the kernel: what compute-sanitizer watches), whole chunks in one launch."""
    import io

    import kvcompile.codec as codec
    from kvcompile.ops.kv_decode.definition import decode_chunks

    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    chunks = [data for _, data in codec.iter_chunks(stream, header)]
    whole = header.tokens // header.chunk_tokens
    parts = [decode_chunks(header, chunks[:whole], device)] if whole else []
    if whole < header.chunks:
        tail = dataclasses.replace(header, chunk_tokens=header.tokens - whole * header.chunk_tokens)
        parts.append(decode_chunks(tail, chunks[whole:], device))
    kv = torch.cat(parts, dim=3)
    return kv[0], kv[1]


def replay(folder: Path, device: str) -> dict:
    """Decode every file of a corpus with codec.decode and through the kv_decode op on `device`:
    the same error, or the same tensors. Run it under compute-sanitizer to check a GPU decoder's reads and writes."""
    import kvcompile.codec as codec

    index = json.loads((folder / "index.json").read_text())
    agree, disagree = 0, []
    for item in index["files"]:
        blob = (folder / item["file"]).read_bytes()
        outcomes = []
        for decode in (codec.decode, lambda data: decode_through_op(data, device)):
            try:
                keys, values = decode(blob)
                outcomes.append((keys.cpu(), values.cpu()))
            except codec.BitstreamError:
                outcomes.append(None)
        cpu, other = outcomes
        same = (cpu is None and other is None) or (cpu is not None and other is not None and all(
            torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
            for a, b in zip(cpu, other)))
        agree += bool(same)
        if not same:
            disagree.append(item["file"])
    return {"device": device, "files": len(index["files"]), "agree": agree, "disagree": disagree[:50]}


def limit_memory(gib: float) -> None:
    """Cap this process's heap: a header that claims a huge shape must fail as MemoryError (a
    finding) instead of taking the machine's memory."""
    import resource

    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=2.0, help="a decode slower than this is a finding")
    parser.add_argument("--out", help="write the survivors' corpus here")
    parser.add_argument("--families", default="raw,resealed", help="comma-separated: raw, resealed.chunk, "
                        "resealed.header (resealed = both)")
    parser.add_argument("--memory-gib", type=float, default=3.0, help="heap limit of this process")
    parser.add_argument("--keep-errors", action="store_true", help="also write the resealed chunk mutants the "
                        "CPU decoder refuses (their headers are valid, so a GPU decoder reads their chunks)")
    parser.add_argument("--replay", help="instead: decode a corpus folder's files on --device and on the CPU")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.replay:  # no heap limit: CUDA maps large address ranges
        print(json.dumps(replay(Path(args.replay), args.device), indent=1))
        return 0
    limit_memory(args.memory_gib)
    print(json.dumps(run(args.count, args.seed, args.timeout_s, args.out, tuple(args.families.split(",")),
                                args.keep_errors), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
