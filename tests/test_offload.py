"""--offload: each component goes to the device only for its turn, the text encoder layer by layer, and the DiT's
blocks stream through two slots (StreamedBlocks). On the CPU the same code path runs with plain copies, so the video
must be bit-identical to the resident pipeline's: offloading moves weights, it never changes arithmetic."""
import numpy as np
import pytest
import torch

import skyreels
from conftest import HEIGHT, WIDTH


@pytest.fixture(scope="module")
def offloaded(tiny_folders):
    return skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, offload=True)


CASES = {
    "synchronous": dict(prompt="a cat", num_frames=9, num_inference_steps=2),
    "asynchronous, blocks of 2, with CFG": dict(prompt="a cat", negative_prompt="blurry", num_frames=21,
                                                num_inference_steps=3, guidance_scale=5.0, ar_step=1,
                                                causal_block_size=2),
}


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_offload_with_streamed_blocks_gives_the_same_video(pipes, offloaded, settings):
    settings = dict(settings, height=HEIGHT, width=WIDTH, seed=0)
    assert np.array_equal(offloaded.generate(**settings), pipes["df"].generate(**settings))
    # Between forwards every block's parameters are back in host memory, not in a slot.
    blocks = offloaded.transformer.blocks
    assert isinstance(blocks, skyreels.StreamedBlocks)
    for block, host in zip(blocks.children(), blocks.host):  # children(): not the streaming __iter__
        assert [p.data_ptr() for p in block.parameters()] == [t.data_ptr() for t in host]


def test_weights_bytes_reads_the_size_from_the_headers(tiny_folders, pipes):
    """The fit check before loading (a model larger than the GPU needs --offload) sizes the weights without
    reading them: numel from the safetensors headers times the load dtype's size."""
    numel = sum(p.numel() for p in pipes["df"].transformer.parameters())
    assert skyreels.weights_bytes(f"{tiny_folders['df']}/transformer", torch.bfloat16) == 2 * numel
