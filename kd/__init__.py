"""kd: knowledge distillation for image classification on PyTorch Lightning."""

__version__ = "0.1.0"
