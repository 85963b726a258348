"""The `kvcompile` command: export, run, inspect, eval, bench."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from kvcompile.cli.options import (add_cache_options, cache_config_from, check_against_model, non_negative_int,
                                   positive_int, ratio_in_unit)
from kvcompile.errors import InternalError, KvcompileError, UsageError
from kvcompile.export import TARGETS

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


def load_for_cli(name: str, dtype: str = None):
    import torch

    from kvcompile.frontend.loading import load_model
    from kvcompile.frontend.tiny_models import TINY_ARCHS, tiny_model

    if name.startswith("tiny-"):
        if name[5:] not in TINY_ARCHS:
            raise UsageError(f"unknown tiny model {name!r}; known: {', '.join('tiny-' + a for a in TINY_ARCHS)}")
        return tiny_model(name[5:])
    return load_model(name, dtype=getattr(torch, dtype) if dtype else None)


def default_output(args, config) -> Path:
    """exported/NAME-CACHE-TARGET: another target or cache never overwrites an artifact silently."""
    return Path("exported") / f"{Path(args.model).name}-{config.kind.value}-{args.target}"


def fuse_check_layer(args, compiled):
    """With --fuse: --check-layer, else the default selector's own check layer for this model."""
    if not args.fuse:
        return None
    if args.check_layer is not None:
        return args.check_layer
    from kvcompile.fusion.selectors import DEFAULT_SELECTOR

    return DEFAULT_SELECTOR.default_check_layer(compiled.spec.num_layers)


def cmd_export(args) -> int:
    from kvcompile.core.pipeline import compile as compile_model
    from kvcompile.export import check_output_dir, export

    config = cache_config_from(args)
    if args.fuse and args.target != "onnx":
        raise UsageError("--fuse applies to --target onnx (a torch artifact fuses with its own program)")
    out_dir = Path(args.output) if args.output else default_output(args, config)
    check_output_dir(out_dir)  # before minutes of work, not after
    with stage(f"loading {args.model}"):
        model = load_for_cli(args.model, args.dtype)
    check_against_model(config, model)
    with stage("tracing with torch.export and running passes"):
        compiled = compile_model(model, config)
    profile = tensorrt_profile_from(args)
    with stage(f"writing {args.target} artifact"):
        final = export(compiled, target=args.target, out_dir=out_dir,
                       fuse_check_layer=fuse_check_layer(args, compiled), codec_level=args.codec,
                       engine_profile=profile)
    out.print(f"exported {args.model} ({config.kind.value} cache, {compiled.spec.num_layers} layers) to {final}")
    if args.target == "tensorrt":  # whether engines were built here, or how to build them
        from kvcompile.export.manifest import load_manifest

        out.print(load_manifest(final, verify_checksums=False)["tensorrt"]["note"])
    return 0


def tensorrt_profile_from(args) -> dict:
    """--max-batch / --max-context: the TensorRT engines' profile (refused with other targets)."""
    given = {name: getattr(args, name) for name in ("max_batch", "max_context") if getattr(args, name, None)}
    if given and args.target != "tensorrt":
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} applies to --target tensorrt (the engines' profile)")
    return given


def cmd_run(args) -> int:
    from kvcompile.cli.run_command import cmd_run as run

    return run(args, stage, console)


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
    check_against_model(config, model)
    with stage("tracing and running passes"):
        compiled = compile_model(model, config)
    print_report(out, compiled.report, title=f"{args.target} → {config.kind} cache", spec=compiled.spec)
    return 0


def cmd_eval(args) -> int:
    from kvcompile.cli.eval_command import run_eval_command

    return run_eval_command(args, load_for_cli, cache_config_from, out, stage)


BENCH_DIR = Path(__file__).resolve().parent.parent.parent / "bench"


def bench_names() -> list:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_")) if BENCH_DIR.is_dir() else []


def cmd_bench(args) -> int:
    import runpy

    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        available = ", ".join(bench_names()) or "none (bench/ ships with the source checkout)"
        raise UsageError(f"no benchmark {args.name!r}; available: {available}")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_codec(args) -> int:
    from kvcompile.cli.codec_command import COMMANDS

    return COMMANDS[args.codec_command](args, out)


def cmd_store(args) -> int:
    from kvcompile.cli.store_command import cmd_store as run_store

    return run_store(args, out)


def cmd_clean(args) -> int:
    from kvcompile.export.manifest import clean

    removed = clean(Path(args.folder))
    for path in removed:
        out.print(f"removed {path}")
    out.print(f"{len(removed)} stale folder(s) removed under {args.folder}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (UsageError's code)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def sub_parser(sub, name, help_text, **kwargs):
    return sub.add_parser(name, help=help_text, description=help_text,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from kvcompile import __version__
    from kvcompile.errors import EXIT_CODES

    codes = "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = Parser(prog="kvcompile", description="Compile the KV cache of a decoder LLM.",
                    epilog=f"exit codes: {codes}")
    parser.add_argument("--version", action="version", version=f"kvcompile {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show third-party logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    export = sub_parser(sub, "export", "trace, rewrite and write an artifact folder")
    export.add_argument("model", help="'reference', 'tiny-<arch>', or a local HF checkpoint folder")
    add_cache_options(export)
    export.add_argument("--target", choices=TARGETS, default="torch", help="artifact kind")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: "
                        "the checkpoint's; float32 on CPU)")
    export.add_argument("-o", "--output", help="artifact folder (default exported/NAME-CACHE-TARGET)")
    export.add_argument("--fuse", action="store_true", help="onnx: also write check.onnx, the graph KV fusion's "
                        "check pass runs (`kvcompile run --chunks` on the artifact)")
    export.add_argument("--check-layer", type=non_negative_int, default=None,
                        help="with --fuse: the check layer (default: the default selector's, 2/3 of the depth)")
    export.add_argument("--max-batch", type=positive_int, help="tensorrt: largest batch of the engines (default 4)")
    export.add_argument("--max-context", type=positive_int, help="tensorrt: largest context of the engines "
                        "(default the model's, at most 2048)")
    export.add_argument("--codec", type=int, choices=(0, 1, 2, 3, 4), metavar="LEVEL", help="record KV codec level "
                        "LEVEL (0 lossless for 8-bit KV … 3 aggressive; 4 the default, between 1 and 2) and the model "
                        "fingerprint in the manifest, for contexts restored from bitstreams (`kvcompile run --from-kv`)")
    export.set_defaults(func=cmd_export)

    run = sub_parser(sub, "run", "generate text with an exported artifact (streams the text)")
    run.add_argument("artifact", help="an artifact folder written by `kvcompile export`")
    run.add_argument("--prompt", required=True, help="the text to continue ('-' reads it from standard input)")
    run.add_argument("--max-new-tokens", type=non_negative_int, default=32, help="tokens to generate")
    run.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"),
                     help="default: the one the artifact's target needs (a tensorrt artifact also runs on onnxruntime)")
    sampling = run.add_argument_group("sampling (greedy unless one of these is given; transformers' semantics)")
    sampling.add_argument("--temperature", type=float, help="divide logits by this (> 0); default 1")
    sampling.add_argument("--top-k", type=non_negative_int, help="keep the k most likely tokens (0 = off); default 50")
    sampling.add_argument("--top-p", type=float, help="keep the smallest set reaching this probability; default 1")
    sampling.add_argument("--seed", type=int, help="seed of the sampler (same seed, same text)")
    fusion = run.add_argument_group("KV fusion: the prompt follows these chunks (ONNX artifacts: exported --fuse)")
    fusion.add_argument("--chunks", nargs="+", metavar="FILE", help="text files, each a chunk whose KV cache is "
                        "computed alone and reused (re-rotated to its place)")
    fusion.add_argument("--recompute-ratio", type=ratio_in_unit, default=0.15,
                        help="share of the chunk tokens recomputed")
    fusion.add_argument("--selector", choices=("query_spans", "deviation", "gradual_deviation", "chunk_head",
                                               "query_attention"),
                        default="query_spans",
                        help="which tokens are recomputed")
    kv_files = run.add_argument_group("KV files (kvcompile codec)")
    kv_files.add_argument("--save-kv", metavar="PATH", help="also save the prompt's KV cache here (safetensors, with "
                          "the model fingerprint) for `kvcompile codec encode`")
    kv_files.add_argument("--from-kv", metavar="BITSTREAM", help="start from this compressed context (`kvcompile "
                          "codec encode`) instead of prefilling it; the prompt follows it")
    run.set_defaults(func=cmd_run)

    inspect = sub_parser(sub, "inspect", "what each pass matched and rewrote, per layer")
    inspect.add_argument("target", help="a model name/folder, or an artifact folder")
    add_cache_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    evaluate = sub_parser(sub, "eval", "quality tasks on the reference model")
    evaluate.add_argument("model", nargs="?", default="reference")
    add_cache_options(evaluate)
    evaluate.add_argument("--tasks", type=parse_tasks, default=",".join(EVAL_TASKS),
                          help=f"comma-separated, from: {', '.join(EVAL_TASKS)}")
    evaluate.add_argument("--samples", type=positive_int, default=20, help="examples per task and length")
    evaluate.add_argument("--json", help="also write the results as JSON here")
    evaluate.add_argument("--decode-tail", type=non_negative_int, help="feed each prompt's last N tokens as decode "
                          "steps (default 16 for kcache, so the question reads the compressed cache)")
    evaluate.add_argument("--runner", choices=("compiled", "hf"), default="compiled",
                          help="score kvcompile's compiled model, or transformers itself (the reference)")
    evaluate.add_argument("--ppl-windows", type=positive_int, default=8, help="held-out windows for perplexity")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    evaluate.add_argument("--device", help="e.g. cuda (default: where the model loads, the CPU)")
    from kvcompile.cli.eval_command import add_length_options  # imports no torch

    add_length_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    bench = sub_parser(sub, "bench", "run a benchmark from bench/ (JSON + plot)")
    bench.add_argument("name", help=f"one of: {', '.join(bench_names()) or 'none here'}")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench.set_defaults(func=cmd_bench)

    clean = sub_parser(sub, "clean", "remove what interrupted exports left behind")
    clean.add_argument("folder", nargs="?", default="exported", help="folder holding artifacts")
    clean.set_defaults(func=cmd_clean)

    from kvcompile.cli.codec_command import add_codec_parser

    add_codec_parser(sub, sub_parser, positive_int)
    sub.choices["codec"].set_defaults(func=cmd_codec)

    from kvcompile.cli.store_command import add_store_parser

    add_store_parser(sub, sub_parser)
    sub.choices["store"].set_defaults(func=cmd_store)
    return parser


EVAL_TASKS = ("perplexity", "retrieval", "cross_chunk")  # kvcompile.eval.TASKS (a test holds them equal)


def parse_tasks(text: str) -> tuple:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(EVAL_TASKS)}")
    return tasks


def quiet_third_party_logs() -> None:
    """The exporters' and transformers' chatter buries the one line that matters (--verbose keeps it)."""
    import logging
    import os
    import warnings

    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_third_party_logs()
    try:
        return args.func(args)
    except KvcompileError as err:
        return report(err, err.exit_code, args.verbose)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except Exception as err:  # a bug: one line, the traceback only on request
        return report(err, InternalError.exit_code, args.verbose, internal=True)


def report(err: Exception, code: int, verbose: bool, internal: bool = False) -> int:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if internal:
        first = f"internal error ({type(err).__name__}): {first} — rerun with --verbose for the traceback and report it"
    if verbose:
        console.print_exception()
    console.print(f"[red]error:[/red] {escape(first)}", highlight=False, soft_wrap=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
