"""The contract every attribution method shares.

::

    explainer = Method(model, **options)       # model: nn.Module mapping (B, C, H, W) to (B, K) scores
    saliency = explainer(x, target, **options)  # same as explainer.get_mask(x, target, **options)

Options may be given at construction or per call; per call wins.  Every method accepts the common options
``batch_size`` (rows per internal pass, ``None`` = memory-aware default), ``score`` (``'logit'``, ``'softmax'``,
``'log_softmax'`` or ``'rest'``, the logit plus its log-probability: what is explained), ``create_graph`` (keep
the map differentiable w.r.t. the model's parameters) and ``amp`` (``True`` or ``torch.bfloat16``/``torch.float16``:
run the model's forwards and backwards under ``torch.autocast`` in that precision while everything the method sums
stays float32; faster on GPUs, at the cost of the low precision's rounding in the gradients: maps typically agree
with float32 ones to a correlation above 0.99, not to 1e-5) and ``channels_last`` (hand the model its (B, C, H, W)
inputs in the channels-last memory format, which convolution kernels on GPUs and recent CPUs run faster, about
20% on a 2-core CPU with ResNet-50; the model's weights are not touched, the maps equal the default's up to float
rounding, and a model that calls ``.view`` on its feature maps may refuse such inputs, so it is off by default),
plus its own options, listed in its class attribute ``defaults``.

A subclass implements :meth:`Explainer._explain`; the base class validates the input, the target and the options,
runs the method inside the state guard (which also serialises calls on one model across threads) with gradients enabled (also under an outer ``torch.no_grad()`` or
``torch.inference_mode()``), and casts the result to float32 (float64 for float64 input) on the input's device.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import numbers
from typing import Any, Callable, ClassVar, ContextManager, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .batching import RowPlanner, check_batch_size
from .guard import preserve_model
from .targets import Target, TargetSpec, resolve_target

COMMON_OPTIONS: Mapping[str, Any] = {"batch_size": None, "score": "logit", "create_graph": False, "amp": False,
                                     "channels_last": False}
AMP_DTYPES = {True: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
_AMP_DTYPE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar("amp_dtype", default=None)
_CHANNELS_LAST: contextvars.ContextVar[bool] = contextvars.ContextVar("channels_last", default=False)


class Explainer:
    """Base class of every attribution method (see the module docstring for the call contract)."""

    #: registry name, set by :func:`attribution.core.registry.register`
    name: ClassVar[str] = ""
    #: ``'gradient'`` methods return (B, C, H, W) signed maps; ``'cam'``, ``'perturbation'``, ``'attention'``,
    #: ``'region'`` (maps constant over image regions, XRAI), ``'magnitude'`` (non-negative maps built from input
    #: gradients, e.g. FORGrad) and ``'baseline'`` (reference maps for the metrics, not explanations, e.g. RandomCAM)
    #: (B, 1, H, W)
    kind: ClassVar[str] = "gradient"
    #: the method's own options and their defaults
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: True when the method evaluates the images themselves in its first pass, so that ``target=None`` can take
    #: each image's arg-max from that pass instead of from an extra forward
    argmax_on_rows: ClassVar[bool] = False
    #: True when the method needs class indices as the target (it reads other classes' scores or the prediction's
    #: class): a callable target gets a ValueError that says so
    needs_class_indices: ClassVar[bool] = False
    #: True when the method differentiates the model twice even without ``create_graph`` (a Hessian-vector product,
    #: a gradient-norm energy): its passes run attention with a twice-differentiable kernel, as create_graph's do
    needs_second_derivative: ClassVar[bool] = False

    def __init__(self, model: nn.Module, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.options: Dict[str, Any] = self._check_option_names(options)

    # ----------------------------------------------------------------------------------------------- options
    def option_names(self) -> set:
        """Names of every option this explainer accepts."""
        return set(COMMON_OPTIONS) | set(self.defaults)

    def _check_option_names(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        known = self.option_names()
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; it accepts {sorted(known)}"
                raise TypeError(f"{type(self).__name__} got an unknown option {key!r}{hint}")
        return dict(options)

    def resolved_options(self, **options: Any) -> Dict[str, Any]:
        """Defaults, then construction options, then the call's options."""
        merged = {**COMMON_OPTIONS, **self.defaults, **self.options, **self._check_option_names(options)}
        check_batch_size(merged["batch_size"])
        for flag in ("create_graph", "channels_last"):
            if not isinstance(merged[flag], bool):
                raise TypeError(f"{flag} must be a bool, got {merged[flag]!r}")
        if merged["amp"] is not False and merged["amp"] not in AMP_DTYPES:
            raise ValueError(f"amp must be False, True, torch.bfloat16 or torch.float16, got {merged['amp']!r}")
        return merged

    # -------------------------------------------------------------------------------------------------- call
    def __call__(self, x: Tensor, target: TargetSpec = None, **options: Any) -> Tensor:
        return self.get_mask(x, target, **options)

    def get_mask(self, x: Tensor, target: TargetSpec = None, **options: Any) -> Tensor:
        """The attribution of ``target`` for each image of ``x`` (B, C, H, W); see the module docstring."""
        opts = self.resolved_options(**options)
        check_input(x, self.model)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        amp = opts.pop("amp")
        token = _AMP_DTYPE.set(AMP_DTYPES[amp] if amp is not False else None)
        layout_token = _CHANNELS_LAST.set(opts.pop("channels_last"))
        try:
            with torch.inference_mode(False), torch.enable_grad(), preserve_model(self.model):
                x = x.detach()
                if x.is_inference():
                    x = x.clone()
                self._check_input_channels(x)
                resolved = resolve_target(target, x.shape[0], x.device, opts.pop("score"))
                self._resolve_argmax(x, resolved, opts["batch_size"])
                twice = opts.get("create_graph") or self._differentiates_twice()
                with twice_differentiable(self.model) if twice else contextlib.nullcontext():
                    saliency = self._explain(x, resolved, **opts)
        finally:
            _AMP_DTYPE.reset(token)
            _CHANNELS_LAST.reset(layout_token)
        return saliency.to(out_dtype).contiguous()

    def _explain(self, x: Tensor, target: Target, **options: Any) -> Tensor:
        raise NotImplementedError

    def _differentiates_twice(self) -> bool:
        """Whether this method, or an explainer it runs (a wrapper's method, a combined map's parts, a meta-CAM's
        base), differentiates the model twice (``needs_second_derivative``)."""
        return self.needs_second_derivative or any(
            isinstance(value, Explainer) and value is not self and value._differentiates_twice()
            for value in vars(self).values())

    def _check_input_channels(self, x: Tensor) -> None:
        """A clear error when ``x``'s channels do not fit the model: the first registered convolution's input
        channels are a hint only (a model may register its head first, or expand grey images itself), so a
        mismatch is confirmed by one forward of the first image before it is reported."""
        channels = expected_channels(self.model)
        if channels is None or x.shape[1] == channels:
            return
        try:
            with torch.no_grad():
                self._forward(x[:1])
        except Exception as error:
            raise ValueError(f"x has {x.shape[1]} channels but the model's first convolution expects {channels}") \
                from error

    # ------------------------------------------------------------------------------------------ shared parts
    def _model_input(self, rows: Tensor) -> Tensor:
        """Rows cast to the dtype the model computes in (so float32 inputs drive fp16/bf16 models), in the
        channels-last memory format when the call asks for it.  Like ``amp``, the format is the outermost call's."""
        rows = rows.to(model_dtype(self.model, rows.dtype))
        if _CHANNELS_LAST.get() and rows.dim() == 4:
            rows = rows.contiguous(memory_format=torch.channels_last)
        return rows

    def _default_module(self, x: Tensor, search: Callable[[nn.Module, Tensor], str]) -> nn.Module:
        """The module ``search(model, first image)`` names for inputs shaped like ``x``: searched once per input
        shape (under the call's precision) and kept by name, so a module renamed or removed since is searched again."""
        names: Dict[Tuple[int, ...], str] = self.__dict__.setdefault("_default_layer_names", {})
        modules = dict(self.model.named_modules())
        key = tuple(x.shape[1:])
        name = names.get(key)
        if name not in modules:
            with self._autocast():
                name = search(self.model, self._model_input(x[:1]))
            names[key] = name
        return modules[name]

    def _autocast(self) -> ContextManager[Any]:
        """``torch.autocast`` in the call's ``amp`` precision, or nothing when ``amp`` is off.  The precision is
        the outermost call's, so explainers that other explainers run inside (SmoothGrad's, combined maps') follow."""
        dtype = _AMP_DTYPE.get()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=model_device(self.model).type if model_device(self.model) else "cpu",
                              dtype=dtype)

    def _forward(self, rows: Tensor) -> Tensor:
        """The model's raw outputs for ``rows`` (cast to the model's dtype, under the call's autocast)."""
        with self._autocast():
            outputs = self.model(self._model_input(rows))
        if not isinstance(outputs, Tensor):
            raise TypeError(f"the model must return a (B, K) tensor of scores, got a {type(outputs).__name__}; wrap "
                            "it in an nn.Module whose forward returns that tensor (e.g. its first output)")
        return outputs

    def _resolve_argmax(self, x: Tensor, target: Target, batch_size: Optional[int]) -> None:
        """Fix ``target=None`` to each image's arg-max class, with forwards of ``x`` in chunks."""
        if not target.pending or self.argmax_on_rows:
            return
        classes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        with torch.no_grad():
            for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
                classes[start:stop] = self._forward(x[start:stop]).argmax(dim=1)
        target.classes = classes

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({type(self.model).__name__}{', ' if opts else ''}{opts})"


def math_attention() -> ContextManager[Any]:
    """``F.scaled_dot_product_attention`` restricted to its math kernel (torch >= 2.3): the fused kernels (flash,
    memory-efficient) have no second derivative, which ``create_graph=True`` (maps differentiated in training) and
    the methods that differentiate twice need on vision transformers."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _TwiceDifferentiableActivations(TorchFunctionMode):
    """``F.hardsigmoid`` as ``relu6(x + 3) / 6`` (the same function): torch has no derivative of
    ``hardsigmoid_backward`` (MobileNetV3's squeeze-and-excitation gates), which create_graph and second-derivative
    methods need.  Its slope is then exactly 1/6 (torch's own backward multiplies by 1/6 rounded to float32: float64
    maps differ from the plain pass's by about 1e-8 relative)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.hardsigmoid and args and isinstance(args[0], Tensor):
            out = F.relu6(args[0] + 3) / 6
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            return args[0].copy_(out) if inplace else out
        return func(*args, **kwargs)


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """The passes of create_graph and of second-derivative methods: attention on its math kernel
    (:func:`math_attention`) and, in a model with ``nn.Hardsigmoid`` modules (the one activation whose backward torch
    cannot differentiate), that activation written out (the mode sees every call, so only where it is needed)."""
    hard = any(isinstance(module, nn.Hardsigmoid) for module in model.modules())
    with math_attention(), _TwiceDifferentiableActivations() if hard else contextlib.nullcontext():
        yield


def model_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer, else ``default``."""
    for tensor in _tensors(model):
        if tensor.is_floating_point():
            return tensor.dtype
    return default


def model_device(model: nn.Module) -> Optional[torch.device]:
    for tensor in _tensors(model):
        return tensor.device
    return None


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def expected_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the model's first 2-D convolution, if it has one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def check_input(x: Tensor, model: nn.Module) -> None:
    """Raise a clear error for an input the model cannot take."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x holds no images (batch size 0)")
    device = model_device(model)
    if device is not None and device != x.device:
        raise ValueError(f"x is on {x.device} but the model is on {device}; move one of them")


def positive_int(value: Any, name: str) -> int:
    """An option that must be a positive integer (an int or a NumPy integer, not a bool), as an int; else a
    ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_number(value: Any, name: str) -> float:
    """An option that must be a number >= 0 (not a bool, not NaN), as a float; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def optional_generator(value: Any) -> Optional[torch.Generator]:
    """The ``generator`` option: None or a ``torch.Generator``; else a TypeError naming it."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
    return value


def finite_number(value: Any, name: str) -> float:
    """An option that must be a finite real number (not a bool), as a float; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive_number(value: Any, name: str) -> float:
    """An option that must be a positive number (not a bool), as a float; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def bound_option(value: Any, name: str) -> Any:
    """A bound of the input domain as given: None, a finite number (as a float) or a floating-point tensor; else a
    ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be None, a finite number or a tensor, got {value!r}")
    return float(value)


def fraction_list(value: Any, name: str) -> Tuple[float, ...]:
    """An option that is one fraction in (0, 1] or a non-empty sequence of them, as a tuple; else a clear error."""
    single = isinstance(value, (int, float)) and not isinstance(value, bool)
    values = (value,) if single else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in values):
        raise ValueError(f"{name} must be a fraction in (0, 1] or a non-empty sequence of them, got {value!r}")
    return tuple(float(v) for v in values)
