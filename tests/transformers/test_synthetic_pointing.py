"""On a tiny ViT trained for a detection-style task on a non-square patch grid, transformer-native maps point at
the evidence; the same maps transposed do not (so the check can fail)."""
from __future__ import annotations

import pytest

import attribution

pytest.importorskip("timm")
from synthetic import pointing_rate, train_task, transposed  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return train_task()


@pytest.mark.parametrize("name", ["generic_attention", "attention_rollout"])
def test_attention_maps_point_at_the_pattern(task, name):
    maps = attribution.create(name, task.model)(task.images, 1)
    rate = pointing_rate(maps, task.patches)
    wrong = pointing_rate(transposed(maps), task.patches)
    print(f"{name}: pointing {rate:.2f}, transposed {wrong:.2f}")
    assert rate >= 0.9
    assert wrong < 0.3
