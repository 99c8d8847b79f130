"""OpenAI-style TorchScript module trees for the loader tests (OpenAI's CLIP .pt files are scripted modules)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class Holder(nn.Module):
    """A scriptable container: parameters, buffers and submodules only."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def script_tree(sd: dict[str, Tensor], extra: dict[str, nn.Module] | None = None) -> nn.Module:
    """A module tree holding ``sd`` (floating tensors as parameters, others as buffers) plus ``extra`` children."""
    root = Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node: nn.Module = root
        for name in parents:
            if name not in node._modules:
                node.add_module(name, Holder())
            node = node._modules[name]  # type: ignore[assignment]
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    for name, module in (extra or {}).items():
        root.add_module(name, module)
    return root


def write_torchscript(sd: dict[str, Tensor], path: Path) -> None:
    """An OpenAI-style TorchScript archive whose ``state_dict()`` has exactly the keys of ``sd``."""
    torch.jit.script(script_tree(sd)).save(str(path))
