"""Separable Gaussian filters, shared by the methods and the metrics that blur images or maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel_1d(size: int, sigma: float, reflect: bool = False, dtype=torch.float64) -> Tensor:
    """A normalised 1-D Gaussian of ``size`` taps.

    With ``reflect=False`` the plain sampled Gaussian.  With ``reflect=True`` the kernel RISE builds by smoothing a
    centred delta of length ``size`` with ``scipy.ndimage.gaussian_filter(delta, sigma)`` (taps out to 4 sigma,
    boundary mode 'reflect', so tails past the ends fold back in and the kernel is flatter than a sampled Gaussian).
    """
    if reflect:  # the centred delta's column of the reflecting blur
        return reflect_blur_matrix(size, sigma)[:, size // 2].to(dtype)
    offsets = torch.arange(size, dtype=dtype) - (size - 1) / 2
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def reflect_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> Tensor:
    """(size, size) float64 matrix of ``scipy.ndimage.gaussian_filter1d(v, sigma, truncate=truncate)`` (mode
    'reflect': the signal mirrored about its edges, edge samples repeated, ``c b a | a b c``, periodic with period
    ``2 size`` however far the kernel reaches): ``blurred = matrix @ v``.  ``sigma=0`` is the identity."""
    if sigma == 0:
        return torch.eye(size, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    weights = weights / weights.sum()
    pos = (torch.arange(size)[:, None] + offsets[None, :]).remainder(2 * size)
    pos = torch.where(pos >= size, 2 * size - 1 - pos, pos)
    return torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, pos, weights.expand(size, -1).contiguous())


def gaussian_blur(images: Tensor, size: int, sigma: float, padding: str = "zeros", reflect_kernel: bool = False
                  ) -> Tensor:
    """Blur each channel of (B, C, H, W) ``images`` with a separable ``size`` x ``size`` Gaussian.

    ``padding='zeros'`` pads with zeros (RISE's ``conv2d(..., padding=klen // 2)``); ``'reflect'`` mirrors the border
    without repeating it (torchvision's ``GaussianBlur``, kornia's ``gaussian_blur2d`` and OpenCV's default
    BORDER_REFLECT_101), or repeats the edge pixels where the image is too small to mirror ``size // 2`` pixels.
    """
    channels = images.shape[1]
    k = gaussian_kernel_1d(size, sigma, reflect=reflect_kernel).to(device=images.device, dtype=images.dtype)
    half = size // 2
    x = images
    if padding == "reflect":
        x = F.pad(x, (half, half, half, half), mode="reflect" if min(x.shape[-2:]) > half else "replicate")
        pad = 0
    elif padding == "zeros":
        pad = half
    else:
        raise ValueError(f"padding must be 'zeros' or 'reflect', got {padding!r}")
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(channels, 1, 1, size), padding=(0, pad), groups=channels)
    return F.conv2d(x, k.view(1, 1, size, 1).expand(channels, 1, size, 1), padding=(pad, 0), groups=channels)


def ideal_low_pass(maps: Tensor, cutoff: float) -> Tensor:
    """Keep the spatial frequencies of (..., H, W) ``maps`` within ``cutoff`` cycles per image of zero, drop the rest.

    The disk ``ky^2 + kx^2 <= cutoff^2`` over the signed integer frequencies of the 2-D DFT (``fftfreq(n) * n``) is
    applied to the real FFT's half spectrum and transformed back at the maps' own size (odd sizes included).  Linear
    and differentiable; a cutoff at or above the largest frequency returns the maps unchanged.
    """
    height, width = maps.shape[-2:]
    real = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    ky = torch.fft.fftfreq(height, d=1.0 / height, dtype=real.dtype, device=maps.device)
    kx = torch.fft.rfftfreq(width, d=1.0 / width, dtype=real.dtype, device=maps.device)
    keep = (ky[:, None].square() + kx[None, :].square() <= cutoff ** 2).to(real.dtype)
    spectrum = torch.fft.rfft2(real)
    return torch.fft.irfft2(spectrum * keep, s=(height, width)).to(maps.dtype)


def box_matrix(size: int, kernel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(size, size): one axis of OpenCV's normalised box filter ``cv2.blur``, as a matrix.

    Output ``i`` averages inputs ``i - kernel // 2`` to ``i - kernel // 2 + kernel - 1`` (OpenCV's centred anchor),
    indices outside the axis mirrored without repeating the edge (``BORDER_REFLECT_101``, OpenCV's default),
    as many times as needed when the kernel is wider than the image.
    """
    taps = torch.arange(size, device=device)[:, None] - kernel // 2 + torch.arange(kernel, device=device)[None, :]
    if size == 1:
        source = torch.zeros_like(taps)
    else:
        period = taps.remainder(2 * size - 2)
        source = torch.where(period < size, period, 2 * size - 2 - period)
    weights = torch.full(taps.shape, 1.0 / kernel, device=device, dtype=dtype)
    return torch.zeros(size, size, device=device, dtype=dtype).scatter_add_(1, source, weights)


def box_blur(images: Tensor, width: int, height: int) -> Tensor:
    """Each channel of (B, C, H, W) ``images`` through ``cv2.blur(image, (width, height))`` (see :func:`box_matrix`):
    the mean over a ``height`` x ``width`` window, borders reflected without repeating the edge."""
    rows = box_matrix(images.shape[-2], height, images.device, images.dtype)
    cols = box_matrix(images.shape[-1], width, images.device, images.dtype)
    return rows @ images @ cols.T
