import torch

from cncad.modules import ResidualAttentionDecoder


def test_one_output_per_block_with_class_token():
    decoder = ResidualAttentionDecoder(dim=32, num_heads=4, depth=3)
    tokens = torch.randn(2, 17, 32)
    outputs = decoder(tokens)
    assert len(outputs) == 3
    assert all(o.shape == (2, 17, 32) for o in outputs)
    # each output feeds the next block
    assert torch.allclose(decoder.blocks[1](outputs[0]), outputs[1], atol=1e-6)


def test_blocks_are_pre_norm():
    decoder = ResidualAttentionDecoder(dim=16, num_heads=2, depth=1)
    block = decoder.blocks[0]
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))
        expected = h + block.mlp(block.norm2(h))
    assert torch.allclose(decoder(x)[0], expected, atol=1e-6)
