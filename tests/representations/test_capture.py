"""Layer-by-layer capture against a whole-model transformers forward, and padding handling."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastmerge.errors import CheckpointError
from fastmerge.io.checkpoint import Checkpoint
from fastmerge.representations.capture import capture_representations, masked_mean, tokenize_batches
from fastmerge.representations.models import build_skeleton, load_tokenizer
from fastmerge.representations.toy import save_toy_llama

SAMPLES = ["the cat sat", "a much longer sample, with punctuation!", "x", "numbers 1234 and more words"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return save_toy_llama(tmp_path_factory.mktemp("toy"), seed=3, num_layers=3)


def _capture(directory, samples, batch_size):
    checkpoint = Checkpoint(directory)
    tokenizer = load_tokenizer(directory)
    batches = tokenize_batches(tokenizer, samples, max_length=64, batch_size=batch_size)
    return capture_representations(checkpoint, build_skeleton(checkpoint.config, directory), batches)


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_layerwise_matches_whole_model_forward(toy):
    reps = _capture(toy, SAMPLES, batch_size=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(toy), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(toy)
    assert reps.shape == (4, len(SAMPLES), 32)
    for s, text in enumerate(SAMPLES):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
        expected = torch.stack([h[0].mean(dim=0) for h in states])
        torch.testing.assert_close(reps[:, s], expected, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_the_pooled_states(toy):
    batched = _capture(toy, SAMPLES, batch_size=4)  # one padded batch
    alone = torch.stack([_capture(toy, [text], batch_size=1)[:, 0] for text in SAMPLES], dim=1)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_missing_block_tensor_is_named(toy, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        _capture(broken, SAMPLES, batch_size=2)


def test_unknown_architecture_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not_a_real_arch"):
        build_skeleton({"model_type": "not_a_real_arch"}, tmp_path)
