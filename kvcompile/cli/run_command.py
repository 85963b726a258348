"""`kvcompile run DIR --prompt TEXT`: generate with an exported artifact, streaming the text.

The backend follows the artifact (a torch program runs on torch, ONNX graphs on ONNX Runtime);
a prompt that cannot fit prompt + --max-new-tokens in the model's context is refused up front,
saying by how much, before any work.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from kvcompile.errors import InputValidationError, UsageError

BACKEND_OF_TARGET = {"torch": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}
# A tensorrt artifact's graphs carry their local functions, so ONNX Runtime runs them too.
ALSO_RUNS_ON = {"tensorrt": ("onnxruntime",)}


def load_artifact(folder: str, backend):
    """(backend object, manifest, backend name) — the backend the artifact's target needs."""
    from kvcompile.export.manifest import load_manifest

    # Only to pick the loader: each loader validates the manifest and every checksum itself.
    manifest = load_manifest(folder, verify_checksums=False)
    target = manifest.get("target")
    wanted = BACKEND_OF_TARGET.get(target)
    if backend is not None and backend != wanted and backend not in ALSO_RUNS_ON.get(target, ()):
        raise UsageError(f"{folder} is a {target} artifact, which runs on --backend {wanted}, not {backend}")
    if backend == "onnxruntime" and target == "tensorrt":
        from kvcompile.runtime.tensorrt import load_graphs_on_onnxruntime

        return load_graphs_on_onnxruntime(folder), manifest, backend
    if wanted == "tensorrt":
        from kvcompile.runtime.tensorrt import load_tensorrt_artifact

        return load_tensorrt_artifact(folder), manifest, wanted
    if wanted == "torch":
        from kvcompile.export.torch_target import load_torch_artifact

        return load_torch_artifact(folder), manifest, wanted
    from kvcompile.runtime.onnxruntime import load_onnx_artifact

    return load_onnx_artifact(folder), manifest, wanted


class TextStream:
    """Prints generated text as tokens arrive; holds back a partial UTF-8 character."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list = []
        self.printed = 0

    def __call__(self, next_ids) -> None:
        self.ids.append(int(next_ids[0]))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return  # the last bytes are the start of a character still to come
        self.write(text[self.printed:])
        self.printed = len(text)


def encode_prompt(tokenizer, prompt: str) -> list:
    try:
        ids = tokenizer.encode(prompt)
    except (ValueError, UnicodeError) as error:
        raise InputValidationError(f"the prompt cannot be tokenized: {str(error).splitlines()[0]}") from None
    if not ids:
        raise InputValidationError("the prompt is empty: give --prompt some text")
    return ids


def cmd_run(args, stage, console) -> int:
    import torch

    from kvcompile.frontend.text_tokenizer import load_text_tokenizer
    from kvcompile.runtime.inputs import check_fits

    with stage(f"loading {args.artifact}"):
        model, manifest, backend = load_artifact(args.artifact, args.backend)
    tokenizer_dir = Path(args.artifact) / manifest["tokenizer"] if manifest.get("tokenizer") else None
    tokenizer = load_text_tokenizer(tokenizer_dir)
    if args.prompt == "-":  # the prompt from standard input (pipes, files, heredocs)
        args.prompt = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    prompt = encode_prompt(tokenizer, args.prompt)
    save_kv, from_kv = getattr(args, "save_kv", None), getattr(args, "from_kv", None)
    if args.chunks and (save_kv or from_kv):
        raise UsageError(f"{'--save-kv' if save_kv else '--from-kv'} cannot be combined with --chunks")
    if save_kv:
        from kvcompile.codec.saved_kv import prompt_kv

        with stage(f"saving the prompt's KV cache to {save_kv}"):
            prompt_kv(model, prompt).save(save_kv)
    if args.chunks:
        return run_fused(args, model, backend, tokenizer, prompt, console)
    if from_kv:
        return run_from_kv(args, model, backend, tokenizer, prompt, console)
    check_fits(len(prompt), args.max_new_tokens, model.spec.max_context)
    sys.stdout.write(args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    stream = TextStream(tokenizer, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    start = time.perf_counter()
    output = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens,
                            do_sample=args.temperature is not None or args.top_k is not None or args.top_p is not None
                            or args.seed is not None,
                            temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=50 if args.top_k is None else args.top_k,
                            top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, on_tokens=stream)
    elapsed = time.perf_counter() - start
    stream.flush()
    sys.stdout.write("\n")
    count = output.shape[1] - len(prompt)
    console.print(f"[dim]{count} tokens in {elapsed:.2f} s ({count / max(elapsed, 1e-9):.1f} tok/s, {backend})[/dim]")
    return 0


def run_fused(args, model, backend, tokenizer, prompt, console) -> int:
    """--chunks: each file is a chunk whose KV is computed alone, then fused with the prompt
    (on an ONNX artifact, the check pass runs the check.onnx written by `export --fuse`)."""
    import torch

    chunks = []
    for path in args.chunks:
        try:
            text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
        except OSError as error:
            raise InputValidationError(f"cannot read chunk {path}: {error.strerror or error}") from None
        chunks.append(model.precompute_chunk(torch.tensor(encode_prompt(tokenizer, text))))
    start = time.perf_counter()
    check_layer = None  # the artifact's exported check layer (ONNX), else the selector's own
    new = model.generate_fused(chunks, torch.tensor(prompt), recompute_ratio=args.recompute_ratio,
                               max_new_tokens=args.max_new_tokens, selector=args.selector, check_layer=check_layer)
    elapsed = time.perf_counter() - start
    sys.stdout.write(args.prompt + tokenizer.decode(new[0].tolist()) + "\n")
    count = new.shape[1]
    console.print(f"[dim]{len(chunks)} chunks fused ({args.recompute_ratio:.0%} recomputed, {args.selector}); "
                  f"{count} tokens in {elapsed:.2f} s[/dim]")
    return 0


def run_from_kv(args, model, backend, tokenizer, prompt, console) -> int:
    """--from-kv: the cache starts as the decoded bitstream (no prefill of that context); the
    prompt runs after it, then greedy generation (CompiledModel.generate_from_kv)."""
    import torch

    start = time.perf_counter()
    new = model.generate_from_kv(args.from_kv, torch.tensor([prompt]), max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    sys.stdout.write(args.prompt + tokenizer.decode(new[0, len(prompt):].tolist()) + "\n")
    console.print(f"[dim]context restored from {args.from_kv}; {new.shape[1] - len(prompt)} tokens in "
                  f"{elapsed:.2f} s ({backend})[/dim]")
    return 0
