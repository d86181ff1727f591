"""Targets: what score of the model an attribution explains.

A user gives ``target`` as ``None`` (each image's arg-max class), an ``int`` (one class for every image), a
sequence or ``LongTensor`` of ``B`` class indices, or a callable objective.  :func:`resolve_target` turns any of
these into a :class:`Target`, which maps the model's outputs for a batch of *rows* (images, or points derived
from them: integration steps, noisy copies, occluded copies) to one score per row.  ``owners[r]`` names the
image row ``r`` belongs to, so per-image targets follow their image through every internal expansion.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

TargetSpec = Union[None, int, Sequence[int], Tensor, "np.ndarray", Callable[..., Tensor]]

SCORES = ("logit", "softmax", "log_softmax", "rest")


def apply_score(outputs: Tensor, score: str) -> Tensor:
    """Turn raw model outputs (N, K) into the scores an attribution explains, in at least float32."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return a (B, K) tensor of scores, got a {type(outputs).__name__}")
    if outputs.dim() != 2:
        raise ValueError(
            f"the model must return scores of shape (B, K); it returned shape {tuple(outputs.shape)}"
        )
    if outputs.dtype not in (torch.float32, torch.float64):
        outputs = outputs.float()
    if score == "logit":
        return outputs
    if score == "softmax":
        return outputs.softmax(dim=1)
    if score == "log_softmax":
        return outputs.log_softmax(dim=1)
    if score == "rest":  # Cai, arXiv:2501.06261: the logit plus its log-probability (logit - cross-entropy)
        return outputs + outputs.log_softmax(dim=1)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


class Target:
    """A resolved target for a batch of ``batch`` images.

    Exactly one of ``classes`` (a (B,) LongTensor), ``objective`` (a callable) is set, or neither: then each
    row's own arg-max is explained, which equals the image's arg-max only for rows that *are* the images.
    Methods that evaluate other rows resolve ``None`` to classes first (see ``Explainer._resolve_target``).
    """

    def __init__(
        self,
        batch: int,
        score: str = "logit",
        classes: Optional[Tensor] = None,
        objective: Optional[Callable[..., Tensor]] = None,
    ) -> None:
        self.batch = batch
        self.score = score
        self.classes = classes
        self.objective = objective
        self._takes_owners = objective is not None and _positional_arity(objective) >= 2
        self._checked_range = False

    @property
    def pending(self) -> bool:
        """True while ``None`` has not been resolved to class indices."""
        return self.classes is None and self.objective is None

    def __call__(self, outputs: Tensor, owners: Tensor) -> Tensor:
        """Scores (N,) of rows whose raw model outputs are ``outputs`` (N, K); ``owners`` (N,) are image indices."""
        scores = apply_score(outputs, self.score)
        if self.objective is not None:
            value = self.objective(scores, owners) if self._takes_owners else self.objective(scores)
            if not isinstance(value, Tensor) or value.shape != (scores.shape[0],):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"a callable target must return one score per row, shape ({scores.shape[0]},); it returned {shape}"
                )
            return value
        if self.classes is None:
            return scores.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        if not self._checked_range:
            self._check_range(scores.shape[1])
        return scores.gather(1, self.classes[owners].unsqueeze(1)).squeeze(1)

    def with_score(self, score: str) -> "Target":
        """The same classes or objective under another ``score``."""
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        return Target(self.batch, score, classes=self.classes, objective=self.objective)

    def repeat(self, copies: int) -> "Target":
        """The target of ``B * copies`` rows ordered image-major (row ``r`` is a copy of image ``r // copies``)."""
        if self.classes is not None:
            return Target(self.batch * copies, self.score, classes=self.classes.repeat_interleave(copies))
        if self.objective is not None and self._takes_owners:
            objective, parent = self.objective, copies
            return Target(self.batch * copies, self.score, objective=lambda s, owners: objective(s, owners // parent))
        return Target(self.batch * copies, self.score, objective=self.objective)

    def select(self, images: Tensor) -> "Target":
        """The target of ``len(images)`` new rows, row ``r`` derived from image ``images[r]`` (e.g. its patches)."""
        if self.classes is not None:
            return Target(images.shape[0], self.score, classes=self.classes[images])
        if self.objective is not None and self._takes_owners:
            objective = self.objective
            return Target(images.shape[0], self.score, objective=lambda s, owners: objective(s, images[owners]))
        return Target(images.shape[0], self.score, objective=self.objective)

    def _check_range(self, num_classes: int) -> None:
        low, high = int(self.classes.min()), int(self.classes.max())
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(f"target class {bad} is out of range for a model with {num_classes} outputs")
        self._checked_range = True


def _positional_arity(fn: Callable[..., Tensor]) -> int:
    if isinstance(fn, torch.nn.Module):  # its __call__ takes (*args, **kwargs): the forward says what it takes
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def resolve_target(spec: TargetSpec, batch: int, device: torch.device, score: str = "logit") -> Target:
    """Validate a user's ``target`` for ``batch`` images and return a :class:`Target`.

    A callable receives the scores (N, K) of any number of rows (after the ``score`` transform) and returns (N,);
    if it takes a second positional argument it also receives ``owners`` (N,), the image index of each row, for
    objectives that differ from image to image.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if spec is None:
        return Target(batch, score)
    if callable(spec) and not isinstance(spec, Tensor):
        return Target(batch, score, objective=spec)
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError("target must be a class index, not a bool")
    if isinstance(spec, numbers.Integral):  # int and NumPy integers (e.g. from numpy's argmax)
        classes = torch.full((batch,), int(spec), dtype=torch.long, device=device)
        return Target(batch, score, classes=classes)
    if isinstance(spec, np.ndarray):
        spec = torch.from_numpy(np.ascontiguousarray(spec))
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {spec.dtype}")
        classes = spec.to(device=device, dtype=torch.long).reshape(-1)
        if spec.dim() == 0:
            classes = classes.expand(batch).clone()
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in spec):
            raise TypeError("a target sequence must hold int class indices")
        classes = torch.tensor([int(t) for t in spec], dtype=torch.long, device=device)
    else:
        raise TypeError(
            "target must be None, an int, a sequence, LongTensor or NumPy array of class indices, or a callable; "
            f"got {type(spec).__name__}"
        )
    if classes.numel() != batch:
        raise ValueError(f"target holds {classes.numel()} class indices but the input has {batch} images")
    return Target(batch, score, classes=classes)
