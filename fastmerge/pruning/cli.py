"""The `fastmerge prune CONFIG OUT` subcommand (wired into fastmerge.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Add `prune` to the `fastmerge` subcommands; its handler is `cmd_prune`."""
    parser = subparsers.add_parser("prune", help="prune a model by GAPrune, Fisher, magnitude or random scores")
    parser.add_argument("config", type=Path, help="prune config (YAML; see fastmerge.pruning.config)")
    parser.add_argument("out", type=Path, help="output model directory (pruned weights, masks.safetensors, report)")
    parser.add_argument("--device", default="auto", help="device for the statistics pass: auto, cpu or cuda [default: auto]")
    parser.add_argument("--out-shard-size", default="5GB", help="largest output shard [default: 5GB]")
    parser.add_argument("--backend", choices=("reference", "native", "triton", "cuda"), default=None, help="force one kernel backend")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(handler=cmd_prune)
    return parser


def cmd_prune(args: argparse.Namespace) -> None:
    from .prune import prune

    print(prune(args.config, args.out, device=args.device, out_shard_size=args.out_shard_size,
                overwrite=args.overwrite, backend=args.backend))
