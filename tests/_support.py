"""Helpers shared by the test modules (importable because tests/conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from fastmerge.demo import LlamaShape

REPO = Path(__file__).resolve().parents[1]  # the repository root: where the CLI and bench scripts run
TINY = LlamaShape(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read with the reference safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def fma_f32(w: torch.Tensor, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """An fp32 fused multiply-add: exact fp64 product and sum, rounded once to fp32."""
    return (w.double() * x.double() + acc.double()).float()


def old_triton_interpreter() -> str:
    """Why interpreted Triton kernels cannot give the contract's bytes here, or "" when they can.
    Before 3.9, Triton's interpreter computed tl.fma as a product and a sum (two roundings), so
    interpreted kernels miss the contract's bytes in the last bit; compiled ones are unaffected
    (tests/ops/test_gpu_launches.py compiles them with whatever Triton is installed).
    Reads the installed version without importing triton: an import before TRITON_INTERPRET=1 is
    set (tests/ops/conftest.py sets it) compiles triton's own library functions for a GPU, and
    every interpreted kernel that calls one fails."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("triton")
    except PackageNotFoundError:
        return "triton is not installed"
    if Version(installed).release < (3, 9):
        return f"Triton {installed}'s interpreter rounds tl.fma twice; pip install 'triton>=3.9'"
    return ""


PREFIX = "base_model.model."  # how PEFT names an adapter's tensors


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A LoRA adapter directory as peft writes it: keys under base_model.model., a LORA config."""
    directory.mkdir(parents=True)
    save_file({PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    (directory / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return directory


def mergekit_script(name: str) -> str | None:
    """mergekit's console script `name` (e.g. "mergekit-legacy"): beside FASTMERGE_MERGEKIT_YAML
    (mergekit in a venv of its own), else on PATH; None where mergekit is not installed."""
    yaml_script = os.environ.get("FASTMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    script = Path(yaml_script).with_name(name) if yaml_script else None
    return str(script) if script and script.exists() else shutil.which(name)


def assert_matches_mergekit(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same tensors as mergekit's output, in the same dtypes, each within 1e-6 of its largest
    |value| (issue 4's bound)."""
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
        assert (ours[name].double() - expected.double()).abs().max().item() <= 1e-6 * scale, name


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path) with its SHA-256: to show inputs were never written."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
