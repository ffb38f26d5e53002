"""Checkpoint I/O: validated zero-copy safetensors reading, streaming sharded writing, and
staged output directories that appear only when complete."""

from .checkpoint import Checkpoint
from .output_dir import StagedOutput, copy_model_files
from .safetensors_file import SafetensorsFile, TensorInfo
from .writer import ShardedWriter

__all__ = [
    "Checkpoint",
    "SafetensorsFile",
    "ShardedWriter",
    "StagedOutput",
    "TensorInfo",
    "copy_model_files",
]
