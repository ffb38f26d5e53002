import torch

from fastmerge.methods.base import TensorTask
from fastmerge.methods.masks import mask_output, masked_inputs
from fastmerge.pruning.mask_file import MaskSet


def test_masked_inputs_mask_task_vectors_and_output_mask_zeroes():
    base = torch.randn(4, 8)
    x1, x2 = base + torch.randn(4, 8), base + torch.randn(4, 8)
    keep = torch.rand(4, 8) > 0.5
    masks = MaskSet.from_dense({"w": keep}, "arch")
    task = TensorTask(name="w", inputs=[x1, x2], base=base, params=[{}, {}], global_params={}, out_dtype=torch.float32)
    masked = masked_inputs(task, [masks, None])
    assert torch.equal(masked.inputs[0], torch.where(keep, x1, base)) and masked.inputs[1] is x2
    other = TensorTask(name="v", inputs=[x1], base=base, params=[{}], global_params={}, out_dtype=torch.float32)
    assert masked_inputs(other, [masks]).inputs[0] is x1
    assert torch.equal(mask_output("w", x1, masks), torch.where(keep, x1, torch.zeros(())))
    assert mask_output("v", x1, masks) is x1
