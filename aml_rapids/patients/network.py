"""The attention MIL network: cells embedded one by one, weighted by a learned attention, pooled into a bag.

Gated attention as Ilse et al. 2018 ("Attention-based deep multiple instance learning"): a cell's weight is
``w . (tanh(V h) * sigmoid(U h))``, softmaxed over the bag's cells. ``per_class`` gives each class its own attention
and bag embedding, scored by its own linear output, as SCEMILA (Hehr et al. 2023) does, so the cells that speak for
one class need not be those that speak for another.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, attention_hidden: int = 64,
                 dropout: float = 0.25, per_class: bool = False):
        super().__init__()
        self.per_class = per_class
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention_hidden), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention_hidden), nn.Sigmoid())
        self.attention_w = nn.Linear(attention_hidden, n_classes if per_class else 1)
        if per_class:
            self.class_weight = nn.Parameter(torch.empty(n_classes, hidden).uniform_(-hidden ** -0.5, hidden ** -0.5))
            self.class_bias = nn.Parameter(torch.zeros(n_classes))
        else:
            self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (bags, cells, in_dim), padded; ``mask`` (bags, cells), True on real cells. Returns the logits
        (bags, classes) and the attention (bags, branches, cells): 1 branch, or one per class; padding gets 0."""
        h = self.embed(x)
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h))  # (bags, cells, branches)
        attention = scores.masked_fill(~mask[..., None], float("-inf")).softmax(dim=1)
        pooled = torch.einsum("bnk,bnh->bkh", attention, h)
        if self.per_class:
            logits = (pooled * self.class_weight).sum(dim=-1) + self.class_bias
        else:
            logits = self.head(pooled[:, 0])
        return logits, attention.transpose(1, 2)
