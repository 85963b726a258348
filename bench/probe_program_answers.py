"""Where a reference model fails the program tasks: teacher-forced answer accuracy per kind of assert.

    python bench/probe_program_answers.py --model kvcompile/reference/weights_long --json /tmp/probe.json

Each document (training-split long programs, short programs, chunked chain documents, and
evaluation cross-chunk prompts at several layouts) is run once with its answers in place; for
every `assert X == v` the model's argmax before `v` is compared with `v`. Asserts are grouped
by how X got its value (a literal; a copy whose source still holds that value; a *stale* copy
whose source was overwritten since, the chain's case; "asked before" when X was already
asserted since its assignment, so the answer can be read off that earlier assert) and, for copies, by the "hop": how many
tokens back the copied source's assignment sits from the copy line (what the copy has to reach
while it is read). Evaluation prompts also count the trap (the source's latest value).
The program interpreter here is independent of the generators (as in tests/reference).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict

import torch

HOP_BUCKETS = (64, 256, 1024, 4096)


def hop_bucket(tokens: int) -> str:
    for limit in HOP_BUCKETS:
        if tokens < limit:
            return f"<{limit}"
    return f">={HOP_BUCKETS[-1]}"


def assert_facts(text: str, offset: int = 1) -> list[dict]:
    """One record per assert: the answer's token position, value, kind, hop, and the source's
    latest value (the trap) for copies. `offset`: tokens before the text (the BOS)."""
    value: dict[str, str] = {}
    made: dict[str, tuple] = {}  # name -> ("literal", line_pos) | ("copy", source, line_pos, hop)
    written_at: dict[str, int] = {}
    asked: set[str] = set()  # asserted since the last assignment: the answer is on an earlier line
    facts, pos = [], offset
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if m := re.fullmatch(r"assert (\w+) == (\d+)", body):
            name = m[1]
            kind = made[name]
            record = {"answer_pos": pos + len(body) - len(m[2]), "answer": m[2], "truth": value[name]}
            if kind[0] == "literal":
                record.update(kind="literal")
            else:
                source = kind[1]
                stale = value.get(source) != value[name]
                record.update(kind="stale_copy" if stale else "copy", hop=kind[3],
                              trap=value.get(source) if stale else None)
            record["lookup"] = pos - made[name][-2 if kind[0] == "copy" else 1]  # tokens back to X's line
            if name in asked:
                record["kind"] += " (asked before)"
            asked.add(name)
            facts.append(record)
        elif m := re.fullmatch(r"(\w+) = (\w+)", body):
            dest, src = m[1], m[2]
            if src.isdigit():
                value[dest] = src
                made[dest] = ("literal", pos)
            else:
                value[dest] = value[src]
                made[dest] = ("copy", src, pos, pos - written_at[src])
            written_at[dest] = pos
            asked.discard(dest)
        pos += len(line.encode())
    return facts


@torch.no_grad()
def score_documents(model, texts: list[str], label: str, rows: list[dict]) -> None:
    """Append one row per assert of each text (BOS + text, teacher-forced) to rows."""
    device = next(model.parameters()).device
    for text in texts:
        ids = torch.tensor([[256] + list(text.encode())], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [T, V]
        for fact in assert_facts(text):
            at = fact["answer_pos"]
            guess = int(logits[at - 1].argmax())
            probs = logits[at - 1].softmax(-1)
            row = {"source": label, "kind": fact["kind"], "hit": chr(guess) == fact["answer"],
                   "p_answer": float(probs[ord(fact["answer"])]), "lookup": fact["lookup"]}
            if "hop" in fact:
                row["hop"] = fact["hop"]
            if fact.get("trap"):
                row["trap_hit"] = chr(guess) == fact["trap"]
            rows.append(row)


def summarise(rows: list[dict]) -> dict:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["source"], r["kind"], hop_bucket(r["hop"]) if "hop" in r else "-")].append(r)
    out = {}
    for (source, kind, hop), rs in sorted(groups.items()):
        cell = {"n": len(rs), "acc": round(sum(r["hit"] for r in rs) / len(rs), 3),
                "p_answer": round(sum(r["p_answer"] for r in rs) / len(rs), 3)}
        traps = [r["trap_hit"] for r in rs if "trap_hit" in r]
        if traps:
            cell["trap"] = round(sum(traps) / len(traps), 3)
        out[f"{source} | {kind} | hop {hop}"] = cell
    return out


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from kvcompile.eval import cross_chunk
    from kvcompile.eval.splits import seeded_rng

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder (plain transformers)")
    p.add_argument("--docs", type=int, default=4, help="training documents per source")
    p.add_argument("--doc-bytes", type=int, default=4000)
    p.add_argument("--prompts", type=int, default=20, help="evaluation prompts per layout")
    p.add_argument("--layouts", default="2x64,3x128,6x128,2x512,6x512", help="CHUNKSxTOKENS,...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows: list[dict] = []
    began = time.time()
    makers = {"long_program": cross_chunk.training_long_program_doc, "program": cross_chunk.training_program_doc}
    if hasattr(cross_chunk, "training_chain_doc"):
        makers["chain_doc"] = cross_chunk.training_chain_doc
    for label, make in makers.items():
        # A stream of the training split that the training jobs' (seed, 3, stream) never draw.
        texts = [make(seeded_rng("train", 99, 7, i), args.doc_bytes) for i in range(args.docs)]
        score_documents(model, texts, label, rows)
    for layout in args.layouts.split(","):
        n_chunks, chunk_tokens = map(int, layout.split("x"))
        texts = []
        for i in range(args.prompts):
            ex = cross_chunk.cross_chunk_example(i, 0, "chain", n_chunks, chunk_tokens=chunk_tokens)
            texts.append(ex["text"] + ex["answer"] + "\n")
        score_documents(model, texts, f"eval {layout}", rows)
    summary = summarise(rows)
    for key, cell in summary.items():
        print(f"{key:48s} {json.dumps(cell)}")
    print(f"({time.time() - began:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "args": vars(args), "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
