"""IG² (Integrated Gradient on Iterative Gradient path): equal to the authors' ``ig2.py`` written out one image at a
time, the authors' default step in [0, 255] pixels equal to the default here on [0, 1] images, the closed form and
the parameter derivative on a linear model, the references' semantics, all paths batched together, and option
errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attribution import IG2, create
from attribution.gradients.ig2 import STEP_SIZE
from conftest import LinearModel, RowCounter, central_difference, tiny_cnn


def ig2_written_out(model, image, label, references, steps, step_size, clip_min_max=None, layer=None):
    """One image (C, H, W) against its references (N, C, H, W), as the authors' ``IG2.GetMask`` runs it: the image
    repeated once per reference; the references' representations kept (constants); ``steps`` times, the gradient
    of minus the mean squared error between the representations of the current points and of the references
    (one loss over all paths, ``loss.backward()``), each path's gradient divided by its L2 norm, added times
    ``step_size`` to the displacement, the point clipped to ``clip_min_max`` (none when None) and appended to the
    path; then, for every consecutive pair of path points, ``(old - new) * grad f_label(old)``, averaged over the
    references.  The representation comes from a forward hook as in the authors' notebooks: the input of the
    classifier ``model[-1]`` (their ImageNet example hooks ``model.fc``'s input) or the output of ``layer`` (their
    wafer example).  The model function takes the rows as they are (no preprocessing, as in the wafer example) and
    everything is float64 (the code casts to float32) so that the comparison can be tight.  Returns the map and the
    path (steps + 1, N, C, H, W)."""
    kept = {}
    if layer is None:
        hook = model[-1].register_forward_hook(lambda m, i, o: kept.__setitem__("rep", i[0]))
    else:
        hook = layer.register_forward_hook(lambda m, i, o: kept.__setitem__("rep", o))

    def call_model(batch, args, key):
        rows = torch.tensor(batch, dtype=torch.float64, requires_grad=True)
        logits = model(rows)
        if key == "input_output_gradients":
            return torch.autograd.grad(logits[:, label].sum(), rows)[0].numpy()
        if key == "rep_layer_values":
            return kept["rep"].detach()
        loss = -1 * nn.MSELoss()(kept["rep"], args["layer_baseline"])  # rep_distance_gradients
        loss.backward()
        return rows.grad.numpy()

    try:
        x = np.repeat(image.numpy()[None], references.shape[0], axis=0)
        args = {"layer_baseline": call_model(references.numpy(), {}, "rep_layer_values")}
        delta = np.zeros_like(x)
        path = [x]
        for _ in range(steps):
            grad = call_model(x + delta, args, "rep_distance_gradients")
            norm = np.sqrt(np.sum(np.abs(grad.reshape(grad.shape[0], -1)) ** 2, axis=1))
            delta = delta + grad / norm[:, None, None, None] * step_size
            if clip_min_max is not None:
                delta = np.clip(x + delta, clip_min_max[0], clip_min_max[1]) - x
            path.append(x + delta)
        attr = np.zeros_like(x)
        for old, new in zip(path[:-1], path[1:]):
            attr += (old - new) * call_model(old, args, "input_output_gradients")
        return torch.from_numpy(attr.mean(axis=0)), np.stack(path)
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)


class Divide(nn.Module):
    def __init__(self, by: float) -> None:
        super().__init__()
        self.by = by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.by


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9 * float(theirs.abs().max()))


@pytest.fixture
def model():
    return tiny_cnn().double()


def test_equals_the_written_out_algorithm_with_shared_references_at_the_classifier_input(model):
    torch.manual_seed(3)
    x, refs, labels = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(3, 3, 16, 16,
                                                                                 dtype=torch.float64), [1, 4]
    ours = IG2(model)(x, labels, references=refs, steps=6, step_size=0.7)
    for i, label in enumerate(labels):
        theirs, _ = ig2_written_out(model, x[i], label, refs, steps=6, step_size=0.7)
        close(ours[i], theirs)


def test_equals_the_written_out_algorithm_at_a_layer_with_clipping_and_references_per_image(model):
    """A convolution's output as the representation (the wafer example's choice), two references of each image's
    own (a (B, N, C, H, W) tensor), [0, 1] images clipped to [0, 1]: the written-out paths do reach the bounds."""
    torch.manual_seed(4)
    x, refs, labels = torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, 2, 3, 16, 16,
                                                                                dtype=torch.float64), [0, 2]
    ours = IG2(model)(x, labels, references=refs, target_layer="2", steps=5, step_size=3.0, bounds=(0, 1))
    for i, label in enumerate(labels):
        theirs, path = ig2_written_out(model, x[i], label, refs[i], steps=5, step_size=3.0, clip_min_max=(0, 1),
                                       layer=model[2])
        assert (path[1:] == 0).any() and (path[1:] == 1).any()
        close(ours[i], theirs)


def test_black_references_are_each_images_minimum(model):
    torch.manual_seed(5)
    x, labels = torch.randn(2, 3, 16, 16, dtype=torch.float64), [3, 0]
    ours = IG2(model)(x, labels, steps=4, step_size=1.5)
    for i, label in enumerate(labels):
        black = torch.full((1, 3, 16, 16), float(x[i].min()), dtype=torch.float64)
        theirs, _ = ig2_written_out(model, x[i], label, black, steps=4, step_size=1.5)
        close(ours[i], theirs)


def test_defaults_are_the_authors():
    """ig2.py's GetMask: steps=201, step_size=256.0 on [0, 255] images; the logit is explained."""
    assert IG2.defaults == {"references": "black", "target_layer": None, "steps": 201, "step_size": 256.0 / 255.0,
                            "bounds": None}
    assert STEP_SIZE == 256.0 / 255.0
    assert IG2(tiny_cnn()).resolved_options()["score"] == "logit"


def test_default_step_on_unit_images_is_the_authors_step_on_pixel_images(model):
    """The authors' defaults (201 steps of 256 clipped to [0, 255]) on [0, 255] images through a model that divides
    by 255 give the map that the defaults here, with bounds=(0, 1), give on the same images divided by 255: the
    paths are the same divided by 255 and the gradients 255 times smaller, so the maps are equal."""
    torch.manual_seed(6)
    pixels, refs = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 255, torch.rand(2, 3, 16, 16,
                                                                                   dtype=torch.float64) * 255
    in_pixels = nn.Sequential(Divide(255.0), *model)
    theirs, _ = ig2_written_out(in_pixels, pixels[0], 3, refs, steps=201, step_size=256.0, clip_min_max=(0, 255))
    ours = IG2(model)(pixels / 255, 3, references=refs / 255, bounds=(0, 1))
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=1e-8 * float(theirs.abs().max()))


def path_end_on_the_line(x: torch.Tensor, r: torch.Tensor, steps: int, step: float) -> torch.Tensor:
    """Where the descent of |p - r|^2 by normalised steps ends: along the line from x to r, the signed distance t
    to r moves by step towards 0 each time (past it, it comes back)."""
    t = float((x - r).norm())
    unit = (x - r) / t
    for _ in range(steps):
        t -= step * float(np.sign(t))
    return r + t * unit


def test_linear_model_closed_form_and_completeness():
    """f = W vec(x) + c, whose classifier input is vec(x): each path runs straight at its reference by steps of
    step_size (bouncing about it once there), and the map is W_t * (x - mean_n end_n) exactly, summing to
    f_t(x) - mean_n f_t(end_n)."""
    model = LinearModel().double()
    torch.manual_seed(7)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    refs = torch.cat([torch.randn(2, 3, 8, 8, dtype=torch.float64), x[:1] + 0.05 * torch.randn(1, 3, 8, 8)])
    labels, steps, step = [2, 0], 12, 0.9
    out = IG2(model)(x, labels, references=refs, steps=steps, step_size=step)
    for i, label in enumerate(labels):
        ends = torch.stack([path_end_on_the_line(x[i], r, steps, step) for r in refs])
        weight = model.linear.weight[label].detach().view(3, 8, 8)
        close(out[i], weight * (x[i] - ends.mean(0)))
        with torch.no_grad():
            completeness = model(x[i:i + 1])[0, label] - model(ends)[:, label].mean()
        torch.testing.assert_close(out[i].sum(), completeness)


def test_create_graph_gives_the_derivative_wrt_the_weights_on_a_linear_model():
    """On the linear model the paths do not depend on W, so d sum(A) / dW_t = x - mean_n end_n, also by central
    differences."""
    model = LinearModel().double()
    torch.manual_seed(8)
    x, refs = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = IG2(model, references=refs, steps=5, step_size=1.3)
    out = explainer(x, 1, create_graph=True)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), model.linear.weight)
    ends = torch.stack([path_end_on_the_line(x[0], r, 5, 1.3) for r in refs])
    expected = torch.zeros_like(grad)
    expected[1] = (x[0] - ends.mean(0)).flatten()
    close(grad, expected)
    direction = torch.randn_like(model.linear.weight)
    numeric = central_difference(lambda: explainer(x, 1).sum(), model.linear.weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_references_average_and_per_image_sets_equal_shared_ones(model):
    torch.manual_seed(9)
    x, refs = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    explainer = IG2(model, steps=3, step_size=0.8)
    per_image = explainer(x, [1, 2], references=refs)
    for i, label in enumerate([1, 2]):
        shared = explainer(x[i:i + 1], label, references=refs[i])
        close(per_image[i:i + 1], shared)
        alone = [explainer(x[i:i + 1], label, references=refs[i, n]) for n in range(3)]  # one (C, H, W) image
        close(shared, torch.stack(alone).mean(0))


@pytest.mark.parametrize("batch_size, passes", [(None, [6] * 4), (4, [4, 2] * 4)])
def test_every_path_of_every_image_advances_in_the_same_passes(batch_size, passes):
    """2 images x 3 references = 6 paths, 4 steps: one forward of one image finds the classifier, one of the 3
    references gives their representations, then one pass of all 6 paths per step (batch_size rows at most)."""
    model = tiny_cnn()
    rows = RowCounter(model)
    IG2(model)(torch.randn(2, 3, 16, 16), [0, 1], references=torch.randn(3, 3, 16, 16), steps=4,
               batch_size=batch_size)
    rows.handle.remove()
    assert rows.rows == [1, 3] + passes


def test_a_named_layer_needs_no_classifier_and_its_absence_is_named():
    torch.manual_seed(10)
    conv_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten()).eval()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(ValueError, match="no nn.Linear layer gives the model's outputs; pass target_layer"):
        IG2(conv_head, steps=2)(x, [0, 1])
    out = IG2(conv_head, steps=2, target_layer="1")(x, [0, 1])
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("options, error, match", [
    ({"steps": 0}, ValueError, "steps must be a positive int, got 0"),
    ({"steps": 2.0}, ValueError, "steps must be a positive int"),
    ({"step_size": 0}, ValueError, "step_size must be a positive number, got 0"),
    ({"step_size": -1.0}, ValueError, "step_size must be a positive number"),
    ({"bounds": (1, 0)}, ValueError, r"bounds must be None or a pair \(low, high\)"),
    ({"bounds": 1.0}, ValueError, "bounds must be None or a pair"),
    ({"references": torch.randn(2, 3, 8, 8)}, ValueError,
     r"references must be a \(N, C, H, W\) tensor.*\(2, 3, 8, 8\)"),
    ({"references": torch.randn(3, 2, 3, 16, 16)}, ValueError, r"\(B, N, C, H, W\) tensor with B = 2"),
    ({"references": torch.zeros(0, 3, 16, 16)}, ValueError, "references must be"),
    ({"references": torch.zeros(2, 3, 16, 16, dtype=torch.long)}, ValueError, "non-float tensor"),
    ({"references": "purple"}, ValueError, "references must be a tensor of images, 'black'.*'purple'"),
    ({"references": [0.0, 1.0]}, TypeError, "references must be a tensor of images.*got list"),
    ({"target_layer": "4x"}, ValueError, "no layer named '4x'"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        create("ig2", tiny_cnn(), steps=2)(torch.randn(2, 3, 16, 16), [0, 1], **options)


def test_create_graph_differentiates_through_the_paths():
    """At a conv layer the paths depend on the weights: the map's derivative (float64) equals central differences
    only when the descent's gradients, the points and the references' representations carry the graph (with
    the points held fixed it was 10x off)."""
    model = tiny_cnn().double()
    torch.manual_seed(9)
    x, refs = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = IG2(model, references=refs, target_layer="2", steps=4, step_size=0.5)
    for name in ("4.weight", "0.weight"):  # above the representation's layer, below it
        weight = dict(model.named_parameters())[name]
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(explainer(x, [1, 3], create_graph=True).sum(), weight)
        numeric = central_difference(lambda: explainer(x, [1, 3]).sum(), weight, direction)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-9)
