"""DINO projection head: MLP -> bottleneck -> L2 normalise -> prototype scores.

The same class serves as the DINO (CLS token) head and, as a second instance,
the iBOT (patch token) head.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrototypeLayer(nn.Module):
    """Linear layer without bias whose weight rows (the prototypes) are unit vectors.

    This is weight normalisation with the gain fixed to 1, written as a plain
    Parameter normalised in forward instead of torch.nn.utils weight_norm /
    parametrizations: the state dict then holds one ordinary tensor, which FSDP2
    can shard and a checkpoint can load on any number of ranks.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))  # (K, bottleneck)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., bottleneck) unit vectors, so the output is a cosine similarity in [-1, 1]
        return F.linear(x, F.normalize(self.weight, dim=-1))  # (..., K)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers={nlayers}: need at least 1 layer")
        # nlayers linear layers: in -> hidden -> ... -> hidden -> bottleneck, GELU between them
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = PrototypeLayer(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in_dim) -> (..., out_dim) prototype scores (logits before temperature)
        x = self.mlp(x)
        x = F.normalize(x, dim=-1)  # (..., bottleneck) on the unit sphere
        return self.last_layer(x)


# what defines a pair of heads (ssl.* keys); exports and checkpoints record them so heads can be rebuilt
HEAD_KEYS = ("objective", "prototypes", "head_hidden", "head_bottleneck", "head_layers", "ibot_separate_head",
             "ibot_prototypes")


def build_heads(in_dim: int, heads: dict) -> dict:
    """{"dino_head": DINOHead[, "ibot_head": DINOHead]} for head args (HEAD_KEYS), as student.build_student builds them."""
    make = lambda k: DINOHead(in_dim, k, heads["head_hidden"], heads["head_bottleneck"], heads["head_layers"])  # noqa: E731
    out = {"dino_head": make(heads["prototypes"])}
    if heads["objective"] == "dinov2" and heads["ibot_separate_head"]:
        out["ibot_head"] = make(heads["ibot_prototypes"])
    return out
