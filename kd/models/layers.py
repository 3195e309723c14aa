"""``--list_layers ARCH``: what ``--student_layers``/``--teacher_layers`` may name in a network, with shapes."""

from __future__ import annotations

import torch

from kd.models.build import build_model, check_forward
from kd.tables import text_table


def _shape(output: object) -> str:
    """A module output's per-sample shape, e.g. ``64×8×8``; a tuple's shapes joined by commas."""
    if isinstance(output, torch.Tensor):
        return "×".join(map(str, output.shape[1:])) or "scalar"
    if isinstance(output, (tuple, list)):
        return ", ".join(_shape(item) for item in output)
    return type(output).__name__


def describe_layers(arch: str, image_size: int, num_classes: int) -> str:
    """Every module of ``arch`` that one forward pass of an ``image_size`` image runs, in the order it runs them,
    with its output's shape (per image) and its parameters: the names feature losses hook."""
    model = build_model(arch, num_classes, flag="--list_layers").eval()
    check_forward(model, arch, image_size, num_classes, "--list_layers")  # a failing forward: one line, not a traceback
    outputs: dict[str, object] = {}
    handles = [module.register_forward_hook(lambda _, __, out, name=name: outputs.setdefault(name, out))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    rows = [(name, type(modules[name]).__name__, _shape(out), f"{sum(p.numel() for p in modules[name].parameters()):,}")
            for name, out in outputs.items()]
    return "\n".join([f"{arch} at {image_size} px ({num_classes} classes): its modules in the order a forward pass "
                      "runs them; name any in --student_layers / --teacher_layers",
                      text_table(("module", "type", "output per image", "parameters"), rows)])
