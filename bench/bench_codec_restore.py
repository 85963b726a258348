"""Time to first token from a compressed context vs prefilling it, and what each level keeps.

The bundled reference model; a context of --context held-out bytes and a --query of 16 bytes.
Rows: full prefill of context + query; for each codec level, the context restored from its
bitstream (CompiledModel.restore_cache: decode chunk by chunk into the cache) + the query's
prefill. Also per level: the bitstream's size, the top-1 agreement of the query's next-token
predictions with the full prefill's, and the greedy tokens that agree with full prefill's
(--new tokens). Times are the best of --repeats, on --device.

    python bench/bench_codec_restore.py --out docs/ [--device cuda]   # codec_restore.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import kvcompile
import kvcompile.codec as codec
from kvcompile.codec.saved_kv import prompt_kv
from kvcompile.reference import corpus


def best_of(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else None
    compiled = kvcompile.compile(kvcompile.load_model("reference")).to(args.device)
    text = corpus.text_bytes("heldout", max_bytes=200_000)[50_000:50_000 + args.context + 16]
    ids, query = torch.tensor(list(text[:args.context])), torch.tensor(list(text[args.context:]))
    full_ids = torch.cat([ids, query])[None].to(args.device)
    full_logits = compiled.prefill(full_ids)[0][:, args.context:]
    full_tokens = compiled.generate(full_ids, max_new_tokens=args.new)[0, -args.new:]
    rows = {"full prefill": {"ttft_ms": round(1e3 * best_of(lambda: compiled.prefill(full_ids), args.repeats,
                                                                 args.device), 1)}}
    kv = prompt_kv(compiled, ids)
    for level in codec.LEVELS:
        blob = codec.encode((kv.keys, kv.values), level=level, fingerprint=kv.fingerprint)

        def restored():
            cache = compiled.restore_cache(blob, extra_capacity=query.shape[0])
            return compiled.prefill(query[None].to(args.device), cache=cache)[0]
        logits = restored()
        agree = (logits.argmax(-1) == full_logits.argmax(-1)).float().mean().item()
        tokens = compiled.generate_from_kv(blob, query[None], max_new_tokens=args.new)[0, -args.new:]
        rows[f"level {level}"] = {"ttft_ms": round(1e3 * best_of(restored, args.repeats, args.device), 1),
                                  "bytes": len(blob), "fp16_bytes": 2 * 2 * kv.keys.numel(),
                                  "query_top1_agreement": round(agree, 3),
                                  "greedy_tokens_equal": int((tokens.cpu() == full_tokens.cpu()).sum())}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (1 thread)"
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device,
              "context": args.context, "query": 16, "new": args.new, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "codec_restore.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        print(name, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
