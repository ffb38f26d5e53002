"""LoRA references end to end: a merge that names `model+adapter`, fastmerge against mergekit.

mergekit merges a LoRA adapter into a full copy of the model with peft (the model loaded whole)
and saves that copy to its `--lora-merge-cache` before merging; fastmerge applies the adapter to
each tensor as it reads it. For a generated checkpoint set (bench.checkpoints) this writes a
rank-`--rank` adapter on every linear layer of the first fine-tune (peft's file layout, fp32 as
peft saves it), then runs, each in a fresh process:

  - fastmerge, linear 0.5/0.5 of `ft1+adapter` and ft2;
  - fastmerge, the same merge without the adapter (what applying it costs);
  - mergekit on the LoRA config, with an empty cache each time (what its users wait for).

Prints wall times, peak RSS and the bytes mergekit's cache took, and writes a JSON.
Run: `python -m bench.lora --preset 1b --work /tmp/fm-bench` (add `--no-mergekit` to skip it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from bench.checkpoints import BenchModels, generate, spec_from_args
from bench.e2e import MERGEKIT_YAML, comparison_parser, MergeRun, fastmerge_command, median_run, mergekit_command, run_child
from fastmerge.demo import LlamaShape

LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_adapter(directory: Path, shape: LlamaShape, rank: int, seed: int = 0) -> Path:
    """A LoRA adapter on every linear layer, laid out as peft saves one (A and B in fp32,
    B scaled so the update is about 1% of a unit weight)."""
    generator = torch.Generator().manual_seed(seed)
    dims = dict(shape.tensor_shapes())
    tensors = {}
    for layer in range(shape.num_hidden_layers):
        for module in LINEAR_MODULES:
            name = f"model.layers.{layer}.{module}"
            out, inp = dims[name + ".weight"]
            key = f"base_model.model.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(rank, inp, generator=generator) / inp**0.5
            tensors[key + ".lora_B.weight"] = torch.randn(out, rank, generator=generator) * (0.01 / rank**0.5)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted({m.split(".")[1] for m in LINEAR_MODULES}), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "base_model_name_or_path": None}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def linear_config(first: str, second: Path) -> dict:
    return {"merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": first, "parameters": {"weight": 0.5}}, {"model": str(second), "parameters": {"weight": 0.5}}]}


def timed(tool: str, label: str, command: list[str], out: Path, repeat: int) -> MergeRun:
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(run_child(tool, label, command))
    result = median_run(runs)
    if result.returncode != 0:
        raise SystemExit(f"{tool} {label} failed:\n{result.log_tail}")
    return result


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def bench(models: BenchModels, work: Path, rank: int, repeat: int, with_mergekit: bool) -> dict:
    adapter = write_adapter(work / f"lora-r{rank}", models.spec.shape, rank)
    first, second = models.fine_tunes[0], models.fine_tunes[1]
    configs = {"lora": linear_config(f"{first}+{adapter}", second), "plain": linear_config(str(first), second)}
    paths = {}
    for label, config in configs.items():
        paths[label] = work / f"lora-bench-{label}.yml"
        paths[label].write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / "lora-bench-out"
    runs = {label: timed("fastmerge", label, fastmerge_command(paths[label], out), out, repeat) for label in configs}
    report = {"rank": rank, "adapter_bytes": directory_bytes(adapter), "repeat": repeat,
              "runs": {label: asdict(run) for label, run in runs.items()}}
    if with_mergekit:
        cache = work / "lora-bench-cache"
        shutil.rmtree(cache, ignore_errors=True)
        command = [*mergekit_command(paths["lora"], out), "--lora-merge-cache", str(cache)]
        report["runs"]["mergekit"] = asdict(timed("mergekit", "lora", command, out, 1))
        report["mergekit_cache_bytes"] = directory_bytes(cache)
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="fastmerge runs per config, median reported [1]")
    parser.add_argument("--json", type=Path, default=None, help="results file [default: WORK/lora-PRESET.json]")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.repeat < 1:
        parser.error("--rank and --repeat must be at least 1")
    spec = spec_from_args(args)
    if spec.fine_tunes < 2:
        parser.error("needs --fine-tunes 2 or more")
    label = "custom" if args.custom else args.preset
    models = generate(args.work / label, spec)
    report = bench(models, args.work, args.rank, args.repeat, args.mergekit and MERGEKIT_YAML.exists())
    runs = report["runs"]
    for name, run in runs.items():
        print(f"{name:>9}: {run['wall_s']:7.1f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"adapter (rank {args.rank}): {report['adapter_bytes'] / 1e6:.1f} MB; applying it costs fastmerge "
          f"{runs['lora']['wall_s'] - runs['plain']['wall_s']:+.1f} s")
    if "mergekit" in runs:
        print(f"mergekit / fastmerge: {runs['mergekit']['wall_s'] / runs['lora']['wall_s']:.1f}x; "
              f"mergekit's cache took {report['mergekit_cache_bytes'] / 1e9:.2f} GB")
    path = args.json or args.work / f"lora-{label}.json"
    path.write_text(json.dumps({"preset": label, "spec": spec.to_json(), **report}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
