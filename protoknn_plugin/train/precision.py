"""Mixed precision: ``32``, ``bf16`` or ``16-mixed`` (float16 with a GradScaler).

Only the backbone and the add-on run under autocast. The prototype similarities, the
Sinkhorn transport and the metric losses stay float32: the squared distances expand as
||z||^2 - 2 z.p + ||p||^2, a difference of near-equal terms that 8 mantissa bits (bf16)
turn into noise; the Sinkhorn kernel exp(-C / eps) under- and overflows in float16; and
the margin/cluster losses compare differences of similarities near 1 that bf16 rounds
away. The prototype layer computes its distances with autocast disabled, and the head's
losses see the outputs cast back to float32 (``outputs_to_float``).
"""
from __future__ import annotations

import contextlib
from dataclasses import fields

import torch

from ..errors import ProtoKNNError

_DTYPES = {"bf16": torch.bfloat16, "16-mixed": torch.float16}


class Precision:
    """autocast context + (for float16) a GradScaler around backward/step."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        if name == "16-mixed" and device.type != "cuda":
            raise ProtoKNNError("--precision 16-mixed needs a GPU (float16 on the CPU is slow and unscaled); "
                                "use --precision bf16 on the CPU")
        self.scaler = torch.amp.GradScaler(device.type) if name == "16-mixed" else None

    def autocast(self):
        if self.name == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def outputs_to_float(out):
    """A PrototypeOutputs with every floating tensor as float32 (the losses run in float32)."""
    values = {}
    for f in fields(out):
        value = getattr(out, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        values[f.name] = value
    return type(out)(**values)
