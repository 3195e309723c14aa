"""The loss registry and how a loss is built from its name and the run's settings.

A loss is an ``nn.Module`` (a class built with the settings it names) or a plain function, called as
``loss(student_logits, teacher_logits, labels, **extras)``; it returns a scalar tensor or a dict of
named scalar terms, each logged on its own. A loss's own parameters are trained with the student.

A loss receives only the settings and extras its signature names, so a three-argument loss keeps
working. Settings: ``temperature``, ``num_classes``, ``num_samples`` (training images), ``sample_labels`` (the
class of each training image, by dataset index), ``teacher_network`` (the loaded teacher, frozen; None when only
its cached logits are read: a loss reads what it needs of it, such as OFD's BatchNorm statistics, when built),
``student_shapes`` / ``teacher_shapes`` (per-sample shape of each hooked feature, by layer name) and
its own hyper-parameters (``--loss_options``). Extras: ``student_features`` / ``teacher_features``
(hooked outputs by layer name, paired in order), ``indices`` (dataset indices of the batch) and
``epoch`` (0-based).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar
from collections.abc import Callable

import torch
from torch import nn

from kd.errors import KDError
from kd.registry import Registry, running_user_code

LOSSES: Registry = Registry("loss")
EXTRAS = ("student_features", "teacher_features", "indices", "epoch")
# Asked for by name only (a loss taking **kwargs does not get it): it costs a second forward pass of both networks.
STRONG_VIEW = "strong_view"  # (student's, teacher's) logits of a second, strongly augmented view (MLKD)
RUN_SETTINGS = frozenset({"num_classes", "num_samples", "sample_labels", "student_shapes",  # from the run itself
                          "teacher_shapes", "teacher_network"})
LossOutput = torch.Tensor | dict[str, torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], LossOutput]


@dataclass(frozen=True)
class Range:
    """A search range of one setting for ``--tune``: LOW to HIGH, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = False


class DistillationLoss(nn.Module):
    """Base of kd's losses: the paper's defaults a run starts from, and what the loss needs.

    ``weight`` is the paper's weight of this term and ``ce_weight`` the weight it gives the label
    cross-entropy beside it; ``features`` asks for hooked features; ``connect`` passes the student's
    features through a learned connector to the teacher's shape first (for losses comparing them
    element by element). ``space`` is what ``--tune`` searches: ``weight``, ``ce_weight`` and the
    constructor's own settings, each range holding the paper's value. With ``share_of_total`` the tune
    searches ``weight`` alone and gives the CE weight the rest of the papers' total (Hinton's α and 1 − α).
    """

    weight: float = 1.0
    ce_weight: float = 1.0
    features: bool = False
    connect: bool = False
    needs_teacher: bool = True  # False: the loss ignores the teacher's outputs (a teacher-free method)
    space: ClassVar[dict[str, Range]] = {}
    share_of_total: ClassVar[bool] = False
    # A loss with an init phase (RepDistiller's init(): FSP, AB, FT) defines ``init_loss(student_features,
    # teacher_features)`` and takes ``init_epochs``: a stage of that many epochs before distillation minimises the
    # init losses alone, unweighted, training the loss's :meth:`init_parameters`, and the student too when this is set.
    init_trains_student: ClassVar[bool] = False

    def init_parameters(self) -> list[nn.Parameter]:
        """What the init phase trains of this loss (all of its parameters unless it says otherwise)."""
        return list(self.parameters())

    def main_parameters(self) -> list[nn.Parameter]:
        """What distillation trains of this loss after the init phase (all of its parameters unless it says
        otherwise: FT's paraphraser stays as its init phase left it)."""
        return list(self.parameters())


def loss_property(loss: Loss, name: str) -> Any:
    """A loss's ``weight``/``ce_weight``/``features``/``connect``/``needs_teacher``/``share_of_total``, with the base
    class's default for plain ones."""
    return getattr(loss, name, getattr(DistillationLoss, name))


def wanted_extras(loss: Loss) -> tuple[str, ...]:
    """The extras (features, indices, epoch, strong_view) that ``loss``'s call signature names."""
    try:
        params = inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return EXTRAS
    return tuple(name for name in (*EXTRAS, STRONG_VIEW) if name in params)


def accepted_settings(factory: Any) -> set[str] | None:
    """The settings a loss factory's constructor names (None: it takes ``**kwargs``, so anything)."""
    try:
        # A class without its own __init__ would show nn.Module's (*args, **kwargs): it takes nothing.
        inherited = isinstance(factory, type) and factory.__init__ in (object.__init__, nn.Module.__init__)
        params = {} if inherited or inspect.isfunction(factory) else inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def build_loss(name: str, **settings: Any) -> Loss:
    """Instantiate loss ``name`` (registered, or ``module:Class``) with the settings it accepts.

    Settings the class's ``__init__`` does not name are dropped (unless it takes ``**kwargs``), so a
    loss declares exactly the hyper-parameters it uses, e.g. ``temperature``.
    """
    factory = LOSSES.get(name)
    if inspect.isfunction(factory):  # a plain function is the loss itself
        return factory
    if not callable(factory):
        raise KDError(f"--kd_loss: {name} is not a class or function")
    accepted = accepted_settings(factory)
    if accepted is not None:
        settings = {k: v for k, v in settings.items() if k in accepted}
    with running_user_code(f"--kd_loss {name}: building it"):
        loss = factory(**settings)
    if not callable(loss):
        raise KDError(f"--kd_loss {name}: {type(loss).__name__} instances are not callable")
    return loss


def loss_terms(name: str, output: Any) -> dict[str, torch.Tensor]:
    """A loss's output as named scalar terms: a tensor becomes ``{name: tensor}``."""
    if isinstance(output, dict) and not output:
        raise KDError(f"--kd_loss {name}: returned an empty dict; return a scalar or named scalar terms")
    terms = output if isinstance(output, dict) else {name: output}
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise KDError(f"--kd_loss {name}: term '{key}' must be a scalar tensor, got "
                          f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    return {key if isinstance(output, dict) else name: value.reshape(()) for key, value in terms.items()}
