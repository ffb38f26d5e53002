"""Dtype names shared by the safetensors format, torch and the native kernels.

The native kernels take a small integer code instead of a torch dtype (they do not link
libtorch); the codes here must match csrc/dtype.h.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from .errors import ConfigError, KernelError

# safetensors header name -> torch dtype
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Floating dtypes merges may produce.
FLOAT_OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Codes understood by the native kernels (csrc/dtype.h).
NATIVE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 4,
}

# Names accepted for `dtype:` / `out_dtype:` in configs (mergekit spells them like torch).
CONFIG_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_config_dtype(name: str, key: str) -> torch.dtype:
    """Map a config dtype name to torch, naming the offending key on failure."""
    if not isinstance(name, str) or name.lower() not in CONFIG_NAMES:
        allowed = ", ".join(sorted({"float32", "float16", "bfloat16"}))
        raise ConfigError(f"`{key}: {name!r}` is not a supported dtype; use one of {allowed}")
    return CONFIG_NAMES[name.lower()]


def config_name(dtype: torch.dtype) -> str:
    """The canonical config / HF `torch_dtype` spelling of a dtype."""
    return str(dtype).removeprefix("torch.")


def native_code(dtype: torch.dtype) -> int:
    """The native kernels' code for `dtype`, or a KernelError if they cannot read it."""
    try:
        return NATIVE_CODES[dtype]
    except KeyError:
        raise KernelError(f"native kernels do not support dtype {dtype}") from None


def merged_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """Merged tensors keep their inputs' dtype, where they differ the one torch's promotion gives
    (bf16 with fp32: fp32; bf16 with fp16: fp32), as mergekit's arithmetic on them does; fp8 and
    fp64 inputs count as fp32 (fp8 is read-only)."""
    kept = [d if d in FLOAT_OUTPUT_DTYPES else torch.float32 for d in dtypes]
    return functools.reduce(torch.promote_types, kept)


def kernel_input(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the kernels can read it: fp64 (which none of them reads) as an fp32 copy,
    since fp64 inputs count as fp32 (merged_dtype); any other dtype as it is."""
    return tensor.to(torch.float32) if tensor.dtype == torch.float64 else tensor
