import math

import pytest
import torch

from pathfm.heads import DINOHead


def test_output_is_cosine_to_prototypes_by_hand():
    # nlayers=1: mlp is one Linear(2 -> 2); with identity weights the bottleneck is x itself.
    # x = (3, 4) -> normalised (0.6, 0.8); prototypes (2, 0), (0, 3), (1, 1) -> unit rows
    # (1, 0), (0, 1), (1, 1)/sqrt2 -> cosines 0.6, 0.8, 1.4/sqrt2
    head = DINOHead(in_dim=2, out_dim=3, hidden_dim=5, bottleneck_dim=2, nlayers=1)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(2))
        head.mlp[0].bias.zero_()
        head.last_layer.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    out = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8, 1.4 / math.sqrt(2)]]))


def test_structure_names_and_init():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=64, hidden_dim=256, bottleneck_dim=32, nlayers=3)
    # Linear, GELU, Linear, GELU, Linear(bottleneck); prototypes a plain (K, bottleneck) Parameter
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 256), (256, 256), (256, 32)]
    assert len(head.mlp) == 5 and isinstance(head.mlp[1], torch.nn.GELU)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                      "mlp.4.weight", "mlp.4.bias", "last_layer.weight"}
    assert type(head.last_layer.weight) is torch.nn.Parameter
    assert head.last_layer.weight.shape == (64, 32)
    assert all(not m.bias.any() for m in linears)
    w = head.mlp[2].weight  # 65k samples of trunc_normal(std 0.02, cut at +-2 = +-100 std)
    assert abs(w.std().item() - 0.02) < 0.001


def test_prototype_scale_does_not_matter_and_output_bounded():
    torch.manual_seed(0)
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(5, 8)  # (B, in_dim)
    out = head(x)
    assert out.shape == (5, 10) and out.abs().max().item() <= 1 + 1e-6
    with torch.no_grad():  # weight normalisation with norm fixed to 1: row scale is invisible
        head.last_layer.weight.mul_(torch.arange(1.0, 11.0)[:, None])
    torch.testing.assert_close(head(x), out)


def test_leading_dims_and_gradients_reach_prototypes():
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    out = head(torch.randn(2, 3, 8))  # (crops, B, in_dim)
    assert out.shape == (2, 3, 10)
    out.sum().backward()
    assert head.last_layer.weight.grad is not None and head.mlp[0].weight.grad is not None


def test_bad_nlayers():
    with pytest.raises(ValueError, match="nlayers=0"):
        DINOHead(8, 10, nlayers=0)
