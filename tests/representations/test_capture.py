"""Layer-by-layer capture against a whole-model transformers forward, and padding handling."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastmerge.errors import CheckpointError
from fastmerge.io.checkpoint import Checkpoint
from fastmerge.representations.capture import capture_representations, masked_mean, streamed_forward, tokenize_batches
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


def _without(toy, tmp_path, name: str):
    """A copy of the toy checkpoint that lacks tensor `name`."""
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors[name]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def test_missing_block_tensor_is_named(toy, tmp_path):
    broken = _without(toy, tmp_path, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        _capture(broken, SAMPLES, batch_size=2)


def test_unknown_architecture_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not_a_real_arch"):
        build_skeleton({"model_type": "not_a_real_arch"}, tmp_path)


@pytest.fixture(scope="module")
def toy_qwen3(tmp_path_factory):
    """A toy Qwen3 (q_norm and k_norm inside attention: modules with weights below other modules')."""
    from fastmerge.representations.toy import save_char_tokenizer

    directory = tmp_path_factory.mktemp("qwen3")
    vocab = save_char_tokenizer(directory)
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=2,
                                      eos_token_id=3, pad_token_id=0)
    torch.manual_seed(5)
    transformers.Qwen3ForCausalLM(config).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_streamed_forward_gives_the_whole_models_hidden_states_bit_for_bit(request, family, dtype):
    directory = request.getfixturevalue("toy" if family == "llama" else "toy_qwen3")
    tokenizer = load_tokenizer(directory)
    tokenizer.padding_side = "left"
    inputs = tokenizer(SAMPLES, return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].all(), "the samples should need padding"
    checkpoint = Checkpoint(directory)
    skeleton = build_skeleton(checkpoint.config, directory, dtype=dtype)
    hidden = streamed_forward(checkpoint, skeleton, **inputs)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states
    assert len(hidden) == len(expected) == skeleton.num_layers + 1
    for layer, (got, want) in enumerate(zip(hidden, expected)):
        assert got.dtype == dtype and torch.equal(got, want), layer
    assert all(p.is_meta for p in skeleton.base.parameters()), "weights stayed attached after the forward"


def test_streamed_forward_names_a_missing_tensor_and_cleans_up(toy, tmp_path):
    broken = _without(toy, tmp_path, "model.layers.2.self_attn.o_proj.weight")
    skeleton = build_skeleton(Checkpoint(toy).config, toy)
    inputs = load_tokenizer(toy)(SAMPLES[:1], return_tensors="pt")
    first = streamed_forward(Checkpoint(toy), skeleton, **inputs)

    def hooks() -> int:  # transformers installs hooks of its own on the first forward
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in skeleton.base.modules())

    before = hooks()
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.o_proj.weight"):
        streamed_forward(Checkpoint(broken), skeleton, **inputs)
    assert hooks() == before
    assert all(p.is_meta for p in skeleton.base.parameters())
    again = streamed_forward(Checkpoint(toy), skeleton, **inputs)  # the skeleton is still usable
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_forward_keeps_one_modules_pages_resident(tmp_path, monkeypatch):
    """Each module's checkpoint pages are given back after it runs: pages touched and never
    released stay resident, and memory would grow with the depth of the model."""
    import fastmerge.representations.capture as capture

    # Tensors of megabytes: the kernel maps up to 64 KiB around a fault (fault-around), which may
    # bring back a few pages of a module already given back; that is noise next to real tensors.
    directory = save_toy_llama(tmp_path / "deep", seed=1, hidden_size=128, intermediate_size=4096, num_layers=12)
    layer_bytes = 3 * 128 * 4096 * 4  # a layer's three fp32 MLP projections
    samples = []

    weights = str(directory / "model.safetensors")

    def resident_weights() -> int:
        """Resident bytes of the checkpoint file's mappings (/proc/self/smaps)."""
        total, inside = 0, False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                    inside = fields[-1] == weights
                elif inside and fields[0] == "Rss:":
                    total += int(fields[1]) * 1024
        return total

    drop = capture._drop

    def sampled(module, checkpoint, names):
        samples.append(resident_weights())  # the module's pages, touched by its forward
        drop(module, checkpoint, names)

    monkeypatch.setattr(capture, "_drop", sampled)
    checkpoint = Checkpoint(directory)
    inputs = load_tokenizer(directory)(SAMPLES, return_tensors="pt", padding=True)
    streamed_forward(checkpoint, build_skeleton(checkpoint.config, directory, dtype=torch.bfloat16), **inputs)
    assert len(samples) > 12 * 7
    assert max(samples) > layer_bytes / 3, "the sampler did not see the weights being read"
    assert max(samples) < 2 * layer_bytes, "pages of modules that had run stayed resident"
