"""The `kvcompile` command: export, run, inspect, eval, bench."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from kvcompile.core.modes import CacheKind, SelectMode

console = Console(stderr=True)
# Tables stay readable when piped to a file or CI log (rich assumes 80 columns there).
out = Console(width=None if sys.stdout.isatty() else 160)


@contextmanager
def stage(text: str):
    """A spinner while a long step runs, then its time."""
    start = time.perf_counter()
    with console.status(f"[bold]{text}…"):
        yield
    console.print(f"[green]✓[/green] {text} ({time.perf_counter() - start:.1f} s)")


def cache_config_from(args):
    from kvcompile.core.config import CacheConfig

    topn = args.topn
    if topn is not None and "." in str(topn):
        topn = float(topn)
    elif topn is not None:
        topn = int(topn)
    fields = {"kind": args.cache}
    if topn is not None:
        fields["topn"] = topn
    if args.select:
        fields["select"] = args.select
    if args.full_layers is not None:
        fields["full_layers"] = args.full_layers
    return CacheConfig(**fields)


def load_for_cli(name: str, dtype: str = None):
    import torch

    from kvcompile.frontend.loading import load_model
    from kvcompile.frontend.tiny_models import TINY_ARCHS, tiny_model

    if name.startswith("tiny-") and name[5:] in TINY_ARCHS:
        return tiny_model(name[5:])
    return load_model(name, dtype=getattr(torch, dtype) if dtype else None)


def cmd_export(args) -> int:
    from kvcompile.core.pipeline import compile as compile_model
    from kvcompile.export import check_target, export
    from kvcompile.export.manifest import check_writable_parent

    check_target(args.target)
    config = cache_config_from(args)
    out_dir = Path(args.output or Path("exported") / f"{Path(args.model).name}-{config.kind}")
    check_writable_parent(out_dir)
    with stage(f"loading {args.model}"):
        model = load_for_cli(args.model, args.dtype)
    with stage("tracing with torch.export and running passes"):
        compiled = compile_model(model, config)
    with stage(f"writing {args.target} artifact"):
        final = export(compiled, target=args.target, out_dir=out_dir)
    out.print(f"exported {args.model} ({config.kind} cache, {compiled.spec.num_layers} layers) to {final}")
    return 0


def load_artifact(folder: str, backend: str):
    from kvcompile.export.manifest import load_manifest

    # Only to pick the loader: each loader validates the manifest and every checksum itself.
    manifest = load_manifest(folder, verify_checksums=False)
    if backend == "torch":
        if manifest.get("target") != "torch":
            raise SystemExit(f"error: {folder} is a {manifest.get('target')!r} artifact; use --backend onnxruntime")
        from kvcompile.export.torch_target import load_torch_artifact

        return load_torch_artifact(folder), manifest
    from kvcompile.runtime.onnxruntime import load_onnx_artifact

    return load_onnx_artifact(folder), manifest


def cmd_run(args) -> int:
    import torch

    from kvcompile.frontend.text_tokenizer import load_text_tokenizer

    backend = args.backend or "torch"
    with stage(f"loading {args.artifact} ({backend})"):
        model, manifest = load_artifact(args.artifact, backend)
    tokenizer_dir = Path(args.artifact) / manifest["tokenizer"] if manifest.get("tokenizer") else None
    tokenizer = load_text_tokenizer(tokenizer_dir)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise SystemExit("error: the prompt is empty")
    input_ids = torch.tensor([prompt])
    start = time.perf_counter()
    output = model.generate(input_ids, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    new_tokens = output[0, len(prompt):].tolist()
    out.print(args.prompt + tokenizer.decode(new_tokens), markup=False, highlight=False)
    console.print(f"[dim]{len(new_tokens)} tokens in {elapsed:.2f} s ({len(new_tokens) / elapsed:.1f} tok/s, {backend})[/dim]")
    return 0


def cmd_inspect(args) -> int:
    from kvcompile.cli.inspect_report import print_report

    target = Path(args.target)
    if (target / "manifest.json").is_file():
        from kvcompile.export.manifest import load_manifest
        from kvcompile.passes.manager import PassReport

        manifest = load_manifest(target, verify_checksums=False)
        from kvcompile.core.layout import GraphSpec

        spec = GraphSpec.from_dict(manifest["graph_spec"]) if manifest.get("graph_spec") else None
        print_report(out, PassReport.from_dict(manifest.get("passes", {})),
                     title=f"{target} ({manifest.get('target')} artifact)", spec=spec)
        return 0
    from kvcompile.core.pipeline import compile as compile_model

    config = cache_config_from(args)
    with stage(f"loading {args.target}"):
        model = load_for_cli(args.target)
    with stage("tracing and running passes"):
        compiled = compile_model(model, config)
    print_report(out, compiled.report, title=f"{args.target} → {config.kind} cache", spec=compiled.spec)
    return 0


def cmd_eval(args) -> int:
    from kvcompile.cli.eval_command import run_eval_command

    return run_eval_command(args, load_for_cli, cache_config_from, out)


def cmd_bench(args) -> int:
    import runpy

    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    script = bench_dir / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in bench_dir.glob("bench_*.py")) if bench_dir.is_dir() else []
        raise SystemExit(f"error: no benchmark {args.name!r}; available: {', '.join(available) or 'none (bench/ ships with the source checkout)'}")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_cache_options(parser):
    parser.add_argument("--cache", choices=CacheKind.names(), default=CacheKind.FULL.value, help="KV-cache scheme")
    parser.add_argument("--topn", help="kcache: positions kept (int) or fraction of context (float)")
    parser.add_argument("--select", choices=SelectMode.names(), help="kcache: selection per KV head or per layer")
    parser.add_argument("--full-layers", type=int, help="kcache: first layers keeping V on the device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompile", description="Compile the KV cache of a decoder LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export", help="trace, rewrite and write an artifact folder")
    export.add_argument("model", help="'reference', 'tiny-<arch>', or a local HF checkpoint folder")
    add_cache_options(export)
    export.add_argument("--target", default="torch", help="torch | onnx")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    export.add_argument("-o", "--output", help="artifact folder (default exported/NAME-CACHE)")
    export.set_defaults(func=cmd_export)

    run = sub.add_parser("run", help="generate text with an exported artifact")
    run.add_argument("artifact")
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--backend", choices=("torch", "onnxruntime"))
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="what each pass matched and rewrote, per layer")
    inspect.add_argument("target", help="a model name/folder, or an artifact folder")
    add_cache_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    evaluate = sub.add_parser("eval", help="quality tasks on the reference model")
    evaluate.add_argument("model", nargs="?", default="reference")
    add_cache_options(evaluate)
    evaluate.add_argument("--tasks", default="perplexity,retrieval,cross_chunk")
    evaluate.add_argument("--samples", type=int, default=20, help="examples per task and length")
    evaluate.add_argument("--json", help="also write the results as JSON here")
    evaluate.add_argument("--decode-tail", type=int, help="feed each prompt's last N tokens as decode steps "
                          "(default 16 for kcache, so the question reads the compressed cache)")
    evaluate.add_argument("--runner", choices=("compiled", "hf"), default="compiled",
                          help="score kvcompile's compiled model, or transformers itself (the reference)")
    evaluate.add_argument("--ppl-windows", type=int, default=8, help="held-out windows for perplexity")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    evaluate.add_argument("--device", help="e.g. cuda (default: where the model loads, the CPU)")
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (JSON + plot)")
    bench.add_argument("name", help="e.g. bench_kcache_op")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def known_errors() -> tuple:
    from kvcompile.core.config import ConfigError
    from kvcompile.export import TargetError
    from kvcompile.export.manifest import ArtifactError
    from kvcompile.frontend.attention_capture import UnsupportedAttentionError
    from kvcompile.frontend.loading import LoadError
    from kvcompile.passes.find_attention import AttentionPatternError
    from kvcompile.runtime.cache import HostMemoryError
    from kvcompile.runtime.generate import ContextLengthError
    from kvcompile.frontend.trace import TraceError

    return (ConfigError, TargetError, ArtifactError, LoadError, AttentionPatternError, UnsupportedAttentionError,
            HostMemoryError, TraceError, ContextLengthError)


def quiet_third_party_logs() -> None:
    """The exporters' chatter (e.g. 'torchvision is not installed') buries the one line that matters."""
    import logging
    import warnings

    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    try:
        return args.func(args)
    except known_errors() as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
