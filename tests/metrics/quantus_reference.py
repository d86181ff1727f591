"""What the Quantus parity tests share: Quantus itself (the test module is skipped where it is not installed), its
metrics built quietly, and one small case (the tiny CNN, float64 images, fixed classes)."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import tiny_cnn

#: images in the small case
B = 3
#: Quantus' options that silence its warnings and progress bars
QUIET = {"disable_warnings": True, "display_progressbar": False}


def load_quantus():
    """Quantus, its warnings filtered (skips the calling test module without it)."""
    module = pytest.importorskip("quantus")
    warnings.filterwarnings("ignore", module="quantus")
    return module


def small_case():
    """float32 tiny CNN (Quantus' forwards cast inputs to float32), float64 images, fixed classes."""
    model = tiny_cnn()
    torch.manual_seed(5)
    return model, torch.randn(B, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 1])
