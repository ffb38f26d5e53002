"""The `fastmerge` command and the mergekit-compatible `fastmerge-yaml`, `fastmerge-multi`,
`fastmerge-pytorch`, `fastmerge-legacy`, `fastmerge-layershuffle`, `fastmerge-moe`,
`fastmerge-extract-lora` and `fastmerge-tokensurgeon` drop-ins.

Every FastmergeError is printed as one line and exits with status 2 (the traceback only with
-v), since a config or input problem is the user's to fix and a traceback hides the message.
Ctrl-C, SIGTERM (a job scheduler or `kill` stopping the run) and SIGHUP (a closed terminal) stop
a command the same way: the output in progress is discarded, and the exit status is 128 + the
signal's number.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import FastmergeError
from .pruning.cli import add_prune_parser

EXIT_USER_ERROR = 2


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    _add_output_options(parser, "seed for randomized methods (DARE, DELLA) [default: 0]")
    parser.add_argument("--backend", choices=("reference", "native", "triton", "cuda"), default=None, help="force one kernel backend")
    _add_truncation_option(parser)


def _add_output_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """The flags of every command that reads models and writes one: where it runs, how the output
    is written, what may be read."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda [default: auto]")
    parser.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 500M, 2GB, 5B (bytes) [default: 5GB]")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the kernels [default: all cores]")
    parser.add_argument("--allow-pickle", action="store_true", help="also read pickled weights: pytorch_model*.bin, bare .bin/.pt/.pth (loaded with weights_only=True)")
    parser.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT, an earlier output, if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_truncation_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unsafe-truncate-embeddings", dest="truncate_embeddings", action=argparse.BooleanOptionalAction,
                        default=False, help="merge vocabularies of different sizes by keeping the rows all models have "
                        "(mergekit's flag; assumes those token ids mean the same everywhere)")


def _add_missing_tensor_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-pytorch's two flags for tensors that not every model has (default: an error)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-i", "--tensor-intersection", dest="missing", action="store_const", const="intersection",
                       default="error", help="only merge the tensors every model has")
    group.add_argument("-u", "--tensor-union", dest="missing", action="store_const", const="union",
                       help="merge every tensor any model has, from the models that have it")


def _add_extraction_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-extract-lora's own flags (fastmerge extract-lora and the fastmerge-extract-lora drop-in)."""
    parser.add_argument("--model", required=True, help="the fine-tuned model")
    parser.add_argument("--base-model", required=True, help="the base model")
    parser.add_argument("--out-path", required=True, type=Path, help="output adapter directory")
    parser.add_argument("--max-rank", type=int, default=128, help="largest rank of an update [default: 128]")
    parser.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True, help="split the singular values between A and B [default: on]")
    parser.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False, help="factor the embeddings too instead of saving them whole")
    parser.add_argument("--save-module", dest="modules_to_save", action="append", default=[], help="save this module whole (repeatable)")
    parser.add_argument("-e", "--exclude-regex", dest="exclude", action="append", default=[], help="leave out modules matching this (repeatable)")
    parser.add_argument("-i", "--include-regex", dest="include", action="append", default=[], help="only modules matching one of these (repeatable)")
    parser.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values at or below this [default: 0]")
    parser.add_argument("--skip-undecomposable", action="store_true", help="leave out tensors that are not matrices instead of saving them whole")
    parser.add_argument("--svd", choices=("exact", "randomized"), default="exact", help="full SVD, or randomized subspace iteration (faster) [default: exact]")


def _add_legacy_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-legacy's own flags (fastmerge legacy and the fastmerge-legacy drop-in; the rules
    that make them a config are fastmerge/legacy.py's)."""
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("--merge", action="append", default=[], help="a model to merge (repeatable, in order)")
    parser.add_argument("--base-model", default=None, help="the base model (added to the models when not one of them)")
    parser.add_argument("--method", default="ties", help="merge method [default: ties]")
    parser.add_argument("--weight", type=float, action="append", default=[], help="weight: once for all models or once per model in order (slerp: its t)")
    parser.add_argument("--density", type=float, action="append", default=[], help="density: once for all models or once per model in order")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True, help="divide by the sum of the weights [default: on]")
    parser.add_argument("--int8-mask", action=argparse.BooleanOptionalAction, default=False, help="mergekit's memory option (no effect on the result)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="write bfloat16 (dtype: bfloat16)")
    parser.add_argument("--naive-count", action=argparse.BooleanOptionalAction, default=False, help="accepted and ignored, as mergekit 0.1.5 does")
    parser.add_argument("--print-yaml", action=argparse.BooleanOptionalAction, default=False, help="print the merge config it builds")


def _add_layershuffle_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-layershuffle's own flags (fastmerge layershuffle and the fastmerge-layershuffle
    drop-in; what they build is fastmerge/layershuffle.py's)."""
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("-m", "--model", action="append", default=[], help="a model to draw layers from (repeatable)")
    parser.add_argument("-w", "--weight", type=float, action="append", default=[], help="one per model: its odds per layer, or with --full-random the fraction of its layers it gives")
    parser.add_argument("--full-random", action=argparse.BooleanOptionalAction, default=False, help="draw the layer index too, and shuffle the layers")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="write float16 (dtype: float16)")
    parser.add_argument("--print-yaml", action=argparse.BooleanOptionalAction, default=False, help="print the merge config it builds")
    parser.add_argument("--write-yaml", type=Path, default=None, help="also write the merge config to this file")
    parser.add_argument("--dry-run", action="store_true", help="build the config, merge nothing")


def _add_moe_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-moe's own arguments (fastmerge moe and the fastmerge-moe drop-in; the build is
    fastmerge/moe's)."""
    parser.add_argument("config", type=Path, help="MoE config (YAML): base_model, experts, gate_mode, ...")
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                        help="allow every expert to be the same model")
    parser.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-in-8bit", action="store_true", help=argparse.SUPPRESS)


def _add_tokensurgeon_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-tokensurgeon's own arguments (fastmerge tokensurgeon and the fastmerge-tokensurgeon
    drop-in; the surgery is fastmerge/surgery's). The method is checked by the surgery, so a
    method fastmerge lacks gets an error that names the ones it has."""
    from .surgery.approximate import METHODS, SUBWORD_METHODS, WEIGHT_SCHEMES
    from .surgery.transplant import MATCH_CHOICES

    parser.add_argument("model", type=Path, help="the model that gets the new tokenizer")
    parser.add_argument("donor", type=Path, help="the model whose tokenizer (and embeddings, to approximate from) it gets")
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("-k", "--k", type=int, default=64, help="shared tokens per approximated token (omp, common_interpolation, mp_rope) or per basis vector "
                        "(stb) [default: 64]")
    parser.add_argument("-c", "--cosine-similarity", dest="cosine_similarity", action="store_true", default=False,
                        help="common_interpolation: nearest neighbours by cosine similarity instead of Euclidean distance")
    parser.add_argument("-nc", "--no-cosine-similarity", dest="cosine_similarity", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("-a", "--approximation-method", dest="method", default="omp",
                        help=f"how rows the model lacks are made: {', '.join(METHODS)} [default: omp]")
    parser.add_argument("-w", "--weight-scheme", default="distance_proportional",
                        help=f"common_interpolation's weights: {', '.join(WEIGHT_SCHEMES)} [default: distance_proportional]")
    parser.add_argument("-s", "--subword-method", default="mean", help=f"subword's combination: {', '.join(SUBWORD_METHODS)} [default: mean]")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens approximated at once; -1: all [default: 512]")
    parser.add_argument("-pm", "--prefix-match", choices=MATCH_CHOICES, default="no",
                        help="take the model's row of the longest prefix it has: no, yes, embed or lm_head (that tensor only) [default: no]")
    parser.add_argument("-bm", "--byte-match", choices=MATCH_CHOICES, default="no",
                        help="take the model's row of the other spelling of a byte (a <-> <0x61>): no, yes, embed or lm_head [default: no]")
    parser.add_argument("--magikarp", action=argparse.BooleanOptionalAction, default=False,
                        help="use only tokens well trained in both models (\"Fishing for Magikarp\"): the model's others are "
                        "approximated, donor tokens under-trained in both left zero [default: off]")
    parser.add_argument("-nvn", "--new-vocab-noise", type=float, default=None, help="add Gaussian noise of this std to the approximated rows")
    parser.add_argument("-nvs", "--new-vocab-scale", type=float, default=None, help="scale the approximated rows by this")


class _VersionAction(argparse.Action):
    """--version: the package's version and which build of the native kernels this CPU loads,
    found only when asked (argparse's own version action takes a fixed string)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help="show the version and the native kernels' build, then exit"):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .native_loader import describe_native

        print(f"fastmerge {__version__}\n{describe_native()}")
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmerge", description="Fast, bounded-memory merging of model checkpoints.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def merge_command(name: str, help_text: str, own_options: Callable[[argparse.ArgumentParser], None],
                      handler: Callable[[argparse.Namespace], None],
                      run_flags: Callable[[argparse.ArgumentParser], None] = _add_merge_options) -> argparse.ArgumentParser:
        """A subcommand that writes a model: its own arguments, then the run flags (a merge's by
        default; `run_flags` for commands without kernel backends)."""
        sub = commands.add_parser(name, help=help_text)
        own_options(sub)
        run_flags(sub)
        sub.set_defaults(handler=handler)
        return sub

    run = merge_command("run", "merge the models a mergekit-style YAML config describes", _add_config_and_out, _cmd_run)
    pytorch = merge_command("pytorch", "merge arbitrary checkpoints tensor by tensor, by name (mergekit-pytorch's format)",
                            _add_flat_config_and_out, _cmd_pytorch)

    plan = commands.add_parser("plan", help="show what a config would merge, without writing anything")
    plan.add_argument("config", type=Path)
    plan.add_argument("--flat", action="store_true", help="plan it as `fastmerge pytorch` would merge it (-i and -u imply this)")
    _add_missing_tensor_options(plan)
    plan.add_argument("--allow-pickle", action="store_true")
    _add_truncation_option(plan)
    plan.set_defaults(handler=_cmd_plan)

    demo = commands.add_parser("demo", help="build small example checkpoints and merge them (no downloads)")
    demo.add_argument("dir", type=Path, nargs="?", default=Path("fastmerge-demo"), help="working directory [default: ./fastmerge-demo]")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=_cmd_demo)

    prune = add_prune_parser(commands)

    continual = commands.add_parser("continual", help="merge fine-tunes that arrive in sequence, after each one (RECALL by default)")
    continual.add_argument("out", type=Path, help="output folder: one merged model per step (step_01, step_02, ...)")
    continual.add_argument("checkpoints", type=Path, nargs="+", help="the fine-tunes, in training order")
    continual.add_argument("--method", default="recall", help="merge method for every step [default: recall]")
    continual.add_argument("--base", type=Path, default=None, help="base model (task-vector methods need one)")
    continual.add_argument("--samples", type=Path, nargs="+", default=None, help="one samples file per checkpoint (the new task's data; RECALL needs them)")
    continual.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter for every step, e.g. temperature=0.5 (repeatable)")
    continual.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE", help="parameter of every model entry, e.g. weight=0.5 (repeatable)")
    continual.add_argument("--dtype", default=None, help="output dtype (float32, float16, bfloat16)")
    _add_merge_options(continual)
    continual.set_defaults(handler=_cmd_continual)

    legacy = merge_command("legacy", "merge from mergekit-legacy's flags (--merge, --weight, --density, --method)",
                           _add_legacy_options, _cmd_legacy)
    shuffle = merge_command("layershuffle", "a model stacked from randomly drawn layers of others (mergekit-layershuffle's "
                            "flags)", _add_layershuffle_options, _cmd_layershuffle)
    moe = merge_command("moe", "a mixture of experts (Mixtral, DeepSeek, Qwen2 or Qwen3 MoE) built from dense models "
                        "(mergekit-moe's config)", _add_moe_options, _cmd_moe,
                        partial(_add_output_options, seed_help="seed for the random gate modes and noise_scale [default: 0]"))
    multi = merge_command("multi", "run the merges of a multi-document YAML (mergekit-multi's format) in dependency order",
                          _add_multi_options, _cmd_multi)

    extract = commands.add_parser("extract-lora", help="a LoRA adapter approximating a fine-tune's task vector (mergekit-extract-lora's flags)")
    _add_extraction_options(extract)
    extract.add_argument("--random-seed", dest="seed", type=int, default=0, help="seed of the randomized SVD [default: 0]")
    extract.add_argument("--device", default="auto", help="where the SVDs run: auto (CUDA when available), cpu or cuda [default: auto]")
    extract.add_argument("--threads", type=int, default=None, help="CPU threads [default: all cores]")
    extract.add_argument("--allow-pickle", action="store_true")
    extract.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    extract.add_argument("--quiet", action="store_true")
    extract.set_defaults(handler=_cmd_extract_lora)

    surgeon = merge_command("tokensurgeon", "give a model another model's tokenizer, rows the model lacks approximated "
                            "(mergekit-tokensurgeon's flags)", _add_tokensurgeon_options, _cmd_tokensurgeon,
                            partial(_add_output_options, seed_help="seed for randn, john_hewitt and --new-vocab-noise [default: 0]"))

    for arg in ("-v", "--verbose"):
        for sub in (run, pytorch, plan, demo, prune, continual, legacy, shuffle, moe, multi, extract, surgeon):
            sub.add_argument(arg, action="store_true", dest="verbose", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _merge_options(args: argparse.Namespace) -> dict:
    """The `fastmerge.run` keyword options that _add_merge_options defines."""
    return {
        "device": args.device,
        "out_shard_size": args.out_shard_size,
        "seed": args.seed,
        "threads": args.threads,
        "allow_pickle": args.allow_pickle,
        "copy_tokenizer": args.copy_tokenizer,
        "overwrite": args.overwrite,
        "quiet": args.quiet,
        "backend": args.backend,
        "truncate_embeddings": args.truncate_embeddings,
    }


def _cmd_run(args: argparse.Namespace) -> None:
    from .engine import run

    report = run(
        args.config,
        args.out,
        **_merge_options(args),
    )
    print(report)


def _cmd_pytorch(args: argparse.Namespace) -> None:
    from .engine import run

    print(run(args.config, args.out, flat=args.missing, **_merge_options(args)))


def _cmd_legacy(args: argparse.Namespace) -> None:
    import yaml

    from .engine import run
    from .legacy import legacy_config

    built = legacy_config(args.merge, base_model=args.base_model, method=args.method, weights=args.weight,
                          densities=args.density, normalize=args.normalize, int8_mask=args.int8_mask, bf16=args.bf16,
                          naive_count=args.naive_count)
    for note in built.notes:
        print(f"fastmerge: note: {note}", file=sys.stderr)
    if args.print_yaml:
        print(yaml.safe_dump(built.config, sort_keys=False))
    print(run(built.config, args.out, **_merge_options(args)))


def _cmd_layershuffle(args: argparse.Namespace) -> None:
    import yaml

    from .engine import run
    from .errors import ConfigError
    from .io.lora import open_model
    from .layershuffle import shuffle_config
    from .plan import layer_count

    counts = []
    for model in args.model:
        checkpoint = open_model(model, allow_pickle=args.allow_pickle)
        try:
            counts.append(layer_count(checkpoint))
        finally:
            checkpoint.close()
    config = shuffle_config(args.model, counts, args.weight, full_random=args.full_random, seed=args.seed, fp16=args.fp16)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_yaml:
        print(text)
    if args.write_yaml is not None:
        try:
            args.write_yaml.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--write-yaml {args.write_yaml}: cannot write the config there ({exc.strerror})") from exc
    if not args.dry_run:
        print(run(config, args.out, **_merge_options(args)))


def _set_threads(args: argparse.Namespace) -> None:
    """--threads for the commands that do not pass it on to engine.run."""
    if args.threads is not None:
        from .engine import set_threads

        set_threads(args.threads)


def _cmd_moe(args: argparse.Namespace) -> None:
    from .errors import ConfigError
    from .moe import build_moe

    if args.load_in_4bit or args.load_in_8bit:
        raise ConfigError("--load-in-4bit / --load-in-8bit are not supported: the hidden-state gate modes run the base "
                          "model in bfloat16, as mergekit-moe does without them")
    _set_threads(args)
    print(build_moe(args.config, args.out, device=args.device, out_shard_size=args.out_shard_size, seed=args.seed,
                    allow_pickle=args.allow_pickle, copy_tokenizer=args.copy_tokenizer, overwrite=args.overwrite,
                    quiet=args.quiet, allow_all_same=args.allow_all_same))


def _cmd_tokensurgeon(args: argparse.Namespace) -> None:
    from .surgery import tokensurgeon

    if not args.copy_tokenizer:
        print("fastmerge: note: --no-copy-tokenizer ignored: the output's rows follow the donor's tokenizer, which is "
              "always written (mergekit-tokensurgeon writes it too)", file=sys.stderr)
    _set_threads(args)
    print(tokensurgeon(
        args.model, args.donor, args.out, method=args.method, k=args.k, cosine_similarity=args.cosine_similarity,
        weight_scheme=args.weight_scheme, subword_method=args.subword_method, batch_size=args.batch_size,
        prefix_match=args.prefix_match, byte_match=args.byte_match, magikarp=args.magikarp, new_vocab_noise=args.new_vocab_noise,
        new_vocab_scale=args.new_vocab_scale, device=args.device, out_shard_size=args.out_shard_size, seed=args.seed,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, quiet=args.quiet,
    ))


def _cmd_plan(args: argparse.Namespace) -> None:
    from .engine import prepare_plan

    flat = args.missing if args.flat or args.missing != "error" else None
    print(prepare_plan(args.config, allow_pickle=args.allow_pickle, truncate_embeddings=args.truncate_embeddings,
                       flat=flat).summary())


def _cmd_multi(args: argparse.Namespace) -> None:
    from .multi import run_multi

    for step in run_multi(args.config, args.intermediate_dir, args.out_path, lazy=args.lazy, **_merge_options(args)):
        print(step)


def _cmd_extract_lora(args: argparse.Namespace) -> None:
    from .extraction import extract_lora

    _set_threads(args)
    print(extract_lora(
        args.model, args.base_model, args.out_path, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        quiet=args.quiet, device=args.device, max_rank=args.max_rank, distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
        modules_to_save=args.modules_to_save, include=args.include, exclude=args.exclude, sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable, svd=args.svd, seed=args.seed,
    ))


def _key_values(items: Sequence[str], flag: str) -> dict:
    """`KEY=VALUE` flags; values are read as YAML scalars (0.5 -> float, true -> bool)."""
    import yaml

    from .errors import ConfigError

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        parsed[key] = yaml.safe_load(value)
    return parsed


def _cmd_continual(args: argparse.Namespace) -> None:
    from .continual import run_continual

    steps = run_continual(
        args.checkpoints,
        args.out,
        method=args.method,
        base=args.base,
        params=_key_values(args.param, "--param"),
        model_params=_key_values(args.model_param, "--model-param"),
        samples=[str(p) for p in args.samples] if args.samples else None,
        dtype=args.dtype,
        **_merge_options(args),
    )
    for step in steps:
        print(step)


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.dir, quiet=args.quiet)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so that the
    same unwinding discards the staged output. Python's default for these signals ends the
    process on the spot, which left the hidden temporary output (gigabytes) behind."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _stop_signals_raise():
    """While a command runs, SIGTERM and SIGHUP raise Stopped and Ctrl-C its KeyboardInterrupt,
    unless the parent set them to be ignored (nohup); the first one makes the rest ignored, so
    the clean-up is not cut short (a second Ctrl-C while gigabytes of staged output were being
    deleted left them behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum, _frame):
        for handled in _STOP_SIGNALS:
            signal.signal(handled, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)

    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL):
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _guarded(handler: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    try:
        with _stop_signals_raise():
            handler(args)
    except FastmergeError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"fastmerge: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # what the checks before could not foresee: a file unreadable, a disk full
        print(f"fastmerge: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        signum, how = (exc.signum, f"stopped by {exc}") if isinstance(exc, Stopped) else (signal.SIGINT, "interrupted")
        finished = getattr(exc, "committed_output", None)
        what = f"the finished output is in place at {finished}" if finished else "the output in progress was discarded"
        print(f"fastmerge: {how}; {what}", file=sys.stderr)
        return 128 + signum
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return _guarded(args.handler, args)


# -- mergekit-yaml drop-in -----------------------------------------------------------------

# mergekit flags that tune its own memory handling or features fastmerge does by design.
_IGNORED_MERGEKIT_FLAGS = {
    "lazy_unpickle": "fastmerge always reads lazily (memory-mapped)",
    "low_cpu_memory": "fastmerge's memory is bounded by the largest tensor already",
    "clone_tensors": "fastmerge never aliases output tensors",
    "read_to_gpu": "fastmerge streams to the GPU tensor by tensor",
    "async_write": "fastmerge's writer already overlaps the merge",
    "allow_crimes": "fastmerge checks shapes, not architecture names",
    "write_model_card": "fastmerge does not write a model card",
    "multi_gpu": "fastmerge merges on one device",
    "trust_remote_code": "fastmerge never runs model code",
}
# mergekit flags that take a value: two for LoRA references (model+adapter), which fastmerge
# applies tensor by tensor as it reads them instead of merging a full copy into a cache.
_IGNORED_MERGEKIT_VALUE_FLAGS = {
    "lora_merge_cache": "LoRA adapters are applied as tensors are read; nothing is cached",
    "lora_merge_dtype": "LoRA updates are added in fp32 and rounded once to each tensor's stored dtype, as peft does",
    "transformers_cache": "Hub repositories go to huggingface_hub's cache: set HF_HUB_CACHE or HF_HOME to move it",
    "write_threads": "fastmerge writes on one thread that overlaps the merge",
}


def _add_mergekit_options(parser: argparse.ArgumentParser) -> None:
    """mergekit's merge flags, shared by the mergekit-yaml and mergekit-multi drop-ins."""
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False, help="merge on the GPU")
    parser.add_argument("--gpu-rich", dest="cuda", action="store_true", help="mergekit's alias for --cuda and GPU reads: --cuda")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-shard-size", default="5B", help="bytes per shard, K/M/B suffixes [default: 5B]")
    parser.add_argument("--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--num-threads", "-j", dest="threads", type=int, default=None)
    parser.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("-v", "--verbosity", action="count", default=0)
    _add_truncation_option(parser)
    parser.add_argument("--allow-pickle", action="store_true", help="fastmerge extension: read .bin checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="fastmerge extension: replace an output that exists")
    for flag in _IGNORED_MERGEKIT_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_MERGEKIT_VALUE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)


def _add_config_and_out(parser: argparse.ArgumentParser) -> None:
    """mergekit-yaml's arguments (fastmerge run and the fastmerge-yaml drop-in)."""
    parser.add_argument("config", type=Path, help="merge config (YAML)")
    parser.add_argument("out", type=Path, help="output model directory")


def _add_flat_config_and_out(parser: argparse.ArgumentParser) -> None:
    """mergekit-pytorch's arguments: CONFIG OUT and its -i / -u (fastmerge pytorch and the drop-in)."""
    parser.add_argument("config", type=Path, help="merge config (YAML) with `models:`, each a checkpoint file or directory")
    parser.add_argument("out", type=Path, help="output directory")
    _add_missing_tensor_options(parser)


def _add_multi_options(parser: argparse.ArgumentParser) -> None:
    """mergekit-multi's arguments (fastmerge multi and the fastmerge-multi drop-in)."""
    parser.add_argument("config", type=Path, help="YAML documents, each a merge config with an optional `name`")
    parser.add_argument("--out-path", type=Path, default=None, help="where the unnamed (final) merge goes")
    parser.add_argument("-I", "--intermediate-dir", type=Path, required=True, help="where each named merge goes (DIR/NAME)")
    parser.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True, help="skip merges whose output exists [default: on]")


def _mergekit_main(prog: str, args: argparse.Namespace, command: Callable[[argparse.Namespace], None]) -> int:
    """Translate mergekit's flags to fastmerge's (noting the ignored ones that ask for something:
    a `--no-...` form asks for what fastmerge does anyway), then run `command`."""
    for flag, why in (_IGNORED_MERGEKIT_FLAGS | _IGNORED_MERGEKIT_VALUE_FLAGS).items():
        if getattr(args, flag) not in (None, False) and not args.quiet:
            print(f"{prog}: note: --{flag.replace('_', '-')} accepted and ignored ({why})", file=sys.stderr)
    args.verbose = args.verbosity > 0

    def handler(a: argparse.Namespace) -> None:
        from .errors import ConfigError

        if not a.safe_serialization:
            raise ConfigError("--no-safe-serialization is not supported: fastmerge writes safetensors only")
        a.device = "cuda" if a.cuda else (a.device or "auto")
        a.seed = a.random_seed if a.random_seed is not None else 0
        a.backend = None
        command(a)

    return _guarded(handler, args)


def _drop_in(prog: str, description: str, own_options: Callable[[argparse.ArgumentParser], None],
             command: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    """A mergekit script's drop-in: its own arguments, then mergekit's merge flags, run by `command`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    own_options(parser)
    _add_mergekit_options(parser)
    return _mergekit_main(prog, parser.parse_args(argv), command)


def mergekit_yaml_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-yaml", "Drop-in for mergekit-yaml: same config, same flags, the fastmerge engine.",
                    _add_config_and_out, _cmd_run, argv)


def mergekit_multi_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-multi", "Drop-in for mergekit-multi: merges that build on each other, from one "
                    "multi-document YAML.", _add_multi_options, _cmd_multi, argv)


def mergekit_pytorch_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-pytorch", "Drop-in for mergekit-pytorch: arbitrary checkpoints merged tensor by "
                    "tensor, by name.", _add_flat_config_and_out, _cmd_pytorch, argv)


def mergekit_legacy_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-legacy", "Drop-in for mergekit-legacy: a merge from the old scripts' flags (--merge, "
                    "--weight, --density, --method).", _add_legacy_options, _cmd_legacy, argv)


def mergekit_layershuffle_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-layershuffle", "Drop-in for mergekit-layershuffle: a model stacked from randomly "
                    "drawn layers of others, seeded by --random-seed.", _add_layershuffle_options, _cmd_layershuffle, argv)


def mergekit_moe_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-moe", "Drop-in for mergekit-moe: a Mixtral, DeepSeek, Qwen2 or Qwen3 MoE from dense "
                    "models, routers from prompts or seeded by --random-seed.", _add_moe_options, _cmd_moe, argv)


def mergekit_extract_lora_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-extract-lora", "Drop-in for mergekit-extract-lora: a PEFT LoRA adapter approximating "
                    "a fine-tune's task vector.", _add_extraction_options, _cmd_extract_lora, argv)


def mergekit_tokensurgeon_main(argv: Sequence[str] | None = None) -> int:
    return _drop_in("fastmerge-tokensurgeon", "Drop-in for mergekit-tokensurgeon: a model given a donor's tokenizer, "
                    "the rows it lacks approximated.", _add_tokensurgeon_options, _cmd_tokensurgeon, argv)


if __name__ == "__main__":
    sys.exit(main())
