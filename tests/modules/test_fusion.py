import pytest
import torch

from cncad.modules import FeatureNoise, MultiLayerFusion


def test_fusion_is_concat_then_linear_eq_12():
    torch.manual_seed(0)
    fusion = MultiLayerFusion([3, 4, 5], 6, dropout=0.0)
    layers = [torch.randn(2, 7, c) for c in (3, 4, 5)]
    expected = torch.cat(layers, -1) @ fusion.proj.weight.T + fusion.proj.bias
    assert torch.allclose(fusion(layers), expected, atol=1e-6)
    with pytest.raises(ValueError, match="widths"):
        fusion([torch.randn(2, 7, 3)] * 3)


def test_fusion_dropout_only_in_training():
    fusion = MultiLayerFusion([4, 4], 4, dropout=0.5)
    layers = [torch.randn(2, 3, 4)] * 2
    fusion.eval()
    assert torch.equal(fusion(layers), fusion(layers))
    fusion.train()
    torch.manual_seed(0)
    assert (fusion(layers) == 0).any()


def test_noise_only_in_training_and_scaled_per_channel():
    noise = FeatureNoise(std=0.1)
    torch.manual_seed(0)
    features = torch.randn(4, 500, 2) * torch.tensor([1.0, 100.0])
    noise.eval()
    assert torch.equal(noise(features), features)
    noise.train()
    delta = noise(features) - features
    ratio = delta.std(dim=(0, 1)) / features.std(dim=(0, 1))
    assert torch.allclose(ratio, torch.full((2,), 0.1), rtol=0.1)
    assert torch.equal(FeatureNoise(0.0).train()(features), features)
