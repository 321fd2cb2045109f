"""A user's own network, imported by the CLI through ``--model-class byo_nets:SmallNet`` (tests add this
folder to PYTHONPATH)."""
from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """conv-BN-ReLU, global pooling, a hidden Linear, the head: not one of the toolkit's architectures."""

    def __init__(self, num_classes: int = 10, hidden: int = 32, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.fc1(x)))
