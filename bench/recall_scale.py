"""RECALL at 1B scale on a CPU box: peak RSS of layer-by-layer representation capture against a
whole-model transformers forward, and of a full RECALL merge of two 1.1B models.

    python -m bench.recall_scale capture  /tmp/fm-recall   # layer-by-layer vs whole model
    python -m bench.recall_scale merge    /tmp/fm-recall   # RECALL merge of base + 1 fine-tune

(`--preset tiny` runs the same on bench.checkpoints' tiny shape, in seconds: what the tests run.)

Each measurement runs in a fresh process (peak RSS = getrusage of that process). The models are
bench.checkpoints' `1b` preset (Llama shape: hidden 2048, 22 layers, intermediate 5632, vocab
32000, GQA 4 kv heads, bf16) with a character tokenizer added, so RECALL can tokenize samples.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

SAMPLES = [f"task sample {i}: " + " ".join(["alpha beta gamma delta"] * (1 + i % 4)) for i in range(48)]


def models(workdir: Path, preset: str):
    from bench.checkpoints import PRESETS, GeneratorSpec, generate
    from fastmerge.representations.toy import save_char_tokenizer

    generated = generate(workdir, GeneratorSpec(shape=PRESETS[preset], fine_tunes=1))
    for directory in (generated.base, *generated.fine_tunes):
        if not (directory / "tokenizer_config.json").exists():
            save_char_tokenizer(directory)
    return generated


def capture(directory: Path, mode: str) -> None:
    import torch

    from fastmerge.representations.models import load_tokenizer

    tokenizer = load_tokenizer(directory)
    if mode == "layerwise":
        from fastmerge.io.checkpoint import Checkpoint
        from fastmerge.representations.capture import capture_representations, tokenize_batches
        from fastmerge.representations.models import build_skeleton

        checkpoint = Checkpoint(directory)
        reps = capture_representations(checkpoint, build_skeleton(checkpoint.config, directory), tokenize_batches(tokenizer, SAMPLES[:16], 256, 8))
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        encoded = tokenizer(SAMPLES[:16], padding=True, return_tensors="pt")
        with torch.no_grad():
            reps = torch.stack(model.model(**encoded, output_hidden_states=True).hidden_states)
    print(f"{mode}: representations {tuple(reps.shape)}")


def merge(generated, out: Path) -> None:
    import fastmerge

    config = {
        "merge_method": "recall",
        "models": [{"model": str(generated.base)}, {"model": str(generated.fine_tunes[0])}],
        "parameters": {"samples": SAMPLES, "num_typical": 8, "batch_size": 8},
    }
    print(fastmerge.run(config, out, device="cpu", quiet=True, overwrite=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("capture", "merge", "_child"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--mode", default="layerwise")
    parser.add_argument("--preset", choices=("1b", "tiny"), default="1b")
    args = parser.parse_args()
    if args.what == "_child":
        started = time.perf_counter()
        generated = models(args.workdir, args.preset)
        if args.mode == "merge":
            merge(generated, args.workdir / "recall-merged")
        else:
            capture(generated.base, args.mode)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{args.mode}: {time.perf_counter() - started:.0f} s, peak RSS {peak:.2f} GiB", flush=True)
        return
    models(args.workdir, args.preset)  # generate once, outside the measured processes
    modes = ("layerwise", "whole") if args.what == "capture" else ("merge",)
    for mode in modes:
        subprocess.run([sys.executable, "-m", "bench.recall_scale", "_child", str(args.workdir), "--mode", mode,
                        "--preset", args.preset], check=True)


if __name__ == "__main__":
    main()
