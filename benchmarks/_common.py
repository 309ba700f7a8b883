"""What the benchmark scripts share (not a library module): the device-peak table and the adaLN
randomisation that gives a freshly built LatentDiT real work to do."""

from __future__ import annotations

import torch
from torch import nn

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched by substring of
# torch.cuda.get_device_name(), first match wins (so "H100 PCIe" precedes "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by name (None if the table does not know it)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def randomize_adaln(model: nn.Module, seed: int = 1, std: float = 0.02) -> nn.Module:
    """adaLN-Zero makes a fresh LatentDiT the identity (every block gated off, output 0): draw the
    modulation layers and the final linear from N(0, std^2) so every block does real work and
    output differences mean something. In place; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
