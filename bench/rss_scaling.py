"""Peak RSS of the same merge at two model sizes: it should stay flat as the model grows,
because memory is bounded by the largest tensor, not by the model.

    python bench/rss_scaling.py [--sizes 60M 1G] [--workdir /tmp/fastmerge-rss]

Builds a Llama-shaped base + 2 fine-tunes (bf16, 1 GB shards) per size with fastmerge.demo,
warms the page cache, runs `fastmerge run` (task_arithmetic) in a fresh process per size and
prints its peak RSS (getrusage of the child) next to the model size.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError
from fastmerge.units import format_size, parse_size


WIDE = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)


def shape_for(model_bytes: int) -> LlamaShape:
    """A Llama shape of about `model_bytes` in bf16 that grows by adding layers: the largest
    tensor stays the same, so a flat peak RSS shows memory does not follow the model size.
    Raises ValueError below one layer's model, which could not show that."""
    no_layers = replace(WIDE, num_hidden_layers=0).param_count()
    one_layer = replace(WIDE, num_hidden_layers=1).param_count() - no_layers
    layers = round((model_bytes / 2 - no_layers) / one_layer)
    if layers < 1:
        raise ValueError(f"{format_size(model_bytes)} is below the smallest model of this shape "
                         f"(one layer: {format_size(2 * (no_layers + one_layer))}); ask for more")
    return replace(WIDE, num_hidden_layers=layers)


def model_size(text: str) -> LlamaShape:
    """--sizes entry (50M, 1G, 2GiB, ...) as its shape; argparse reports what it refuses."""
    try:
        return shape_for(parse_size(text))
    except (ConfigError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def child_peak_rss(command: list[str]) -> int:
    """Run `command` in a fresh wrapper process and return the command's peak RSS in bytes."""
    probe = "import resource,subprocess,sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    result = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    return int(result.stdout.strip()) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=model_size, default=[model_size("60M"), model_size("1G")],
                        help="model sizes to build and merge (bf16 bytes: 60M, 1G, 2GiB) [60M 1G]")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fastmerge-rss"))
    args = parser.parse_args()
    print(f"{'model size':>12} {'largest tensor':>15} {'peak RSS':>10}")
    for index, shape in enumerate(args.sizes):
        root = args.workdir / f"size-{index}"
        shutil.rmtree(root, ignore_errors=True)
        base = make_state(shape, 0)
        paths = {"base": write_checkpoint(root / "base", base, shape, max_shard_bytes=10**9)}
        for i in (1, 2):
            paths[f"ft{i}"] = write_checkpoint(root / f"ft{i}", fine_tune_of(base, i), shape, max_shard_bytes=10**9)
        del base
        for path in paths.values():
            for file in path.glob("*.safetensors"):
                file.read_bytes()  # warm the page cache
        config = root / "merge.yml"
        config.write_text(yaml.safe_dump({
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths[n]), "parameters": {"weight": 0.5}} for n in ("ft1", "ft2")],
        }))
        peak = child_peak_rss([sys.executable, "-m", "fastmerge", "run", str(config), str(root / "out"), "--quiet", "--overwrite"])
        model_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
        largest = 2 * max(math.prod(dims) for _, dims in shape.tensor_shapes())
        print(f"{format_size(model_bytes):>12} {format_size(largest):>15} {format_size(peak):>10}", flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
