"""Partition SHAP: shap's PartitionExplainer written out one image at a time, Owen values by their definition,
Shapley values of additive models, efficiency, shap's defaults, batch independence and the shap package itself."""
from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
import torch

from attribution.core.targets import resolve_target
from attribution.core.filters import box_blur
from attribution.perturbation.partition_shap import PartitionSHAP, masking_image, split_boxes
from conftest import CountingModel, LinearModel, central_difference, tiny_cnn


# ------------------------------------------------------------------ shap's algorithm, written out for one image
def shap_image_clustering(height: int, width: int, channels: int) -> np.ndarray:
    """``shap.maskers.Image.build_partition_tree`` in plain Python: scipy-style rows (left id, right id, 0, size);
    ids below M are features of the flat (H, W, C) image, id ``M + i`` is row ``i``, the root is the last row."""
    features = height * width * channels
    clustering = np.zeros((features - 1, 4))
    queue = [(0, 0, height, 0, width, 0, channels, -1, False)]
    ind = features - 2
    while queue:
        _, x0, x1, y0, y1, z0, z1, parent, is_left = heapq.heappop(queue)
        if parent >= 0:
            clustering[parent, 0 if is_left else 1] = ind + features  # shap's numbering (leaves: M - 1 - flat index)
        xw, yw, zw = x1 - x0, y1 - y0, z1 - z0
        if not xw == yw == zw == 1:
            left, right = [x0, x1, y0, y1, z0, z1], [x0, x1, y0, y1, z0, z1]
            if xw >= yw and xw > 1:
                left[1] = right[0] = x0 + xw // 2
            elif yw > 1:
                left[3] = right[2] = y0 + yw // 2
            else:
                left[5] = right[4] = z0 + zw // 2
            for box, flag in ((left, True), (right, False)):
                size = (box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4])
                heapq.heappush(queue, (-size, *box, ind, flag))
        ind -= 1
    for i in range(features - 1):
        sizes = [1 if c < features else clustering[int(c) - features, 3] for c in clustering[i, :2]]
        clustering[i, 3] = sum(sizes)
    return clustering


def node_masks(clustering: np.ndarray) -> list:
    """shap's ``make_masks``: the features (bool, flat (H, W, C)) under every node id."""
    features = clustering.shape[0] + 1
    masks = [np.arange(features) == i for i in range(features)]
    for left, right in clustering[:, :2].astype(int):
        masks.append(masks[left] | masks[right])
    return masks


def lower_credit(i: int, value: float, features: int, values: np.ndarray, clustering: np.ndarray) -> None:
    """shap's ``lower_credit``: a node's value goes down to its children in proportion to their sizes."""
    if i < features:
        values[i] += value
        return
    left, right, _, size = clustering[i - features]
    sizes = [clustering[int(c) - features, 3] if c >= features else 1 for c in (left, right)]
    values[i] += value
    for child, child_size in zip((int(left), int(right)), sizes):
        lower_credit(child, values[i] * child_size / size, features, values, clustering)


def shap_partition_values(model, image, fill, cls, max_evals=500, fixed_context=None, batch_size=10):
    """``PartitionExplainer.explain_row`` + ``owen`` for one (C, H, W) image and one output, following shap 0.51's
    code; ties of priority pop in push order (shap's second key is ``np.random.randn()``).  Returns (C, H, W)."""
    channels, height, width = image.shape
    features = height * width * channels
    clustering = shap_image_clustering(height, width, channels)
    masks = node_masks(clustering)
    flat_x = image.permute(1, 2, 0).reshape(-1)
    flat_fill = fill.permute(1, 2, 0).reshape(-1)

    def fm(mask_rows):
        kept = torch.as_tensor(np.array(mask_rows))
        rows = torch.where(kept, flat_x, flat_fill).view(-1, height, width, channels).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model(rows)[:, cls].numpy()

    m00 = np.zeros(features, dtype=bool)
    f00, f11 = fm([m00])[0], fm([~m00])[0]
    dvalues = np.zeros(2 * features - 1)
    max_evals -= 2
    counter = itertools.count()
    q = [(0, next(counter), (m00, f00, f11, 2 * features - 2, 1.0))]
    eval_count = 0
    while q:
        if eval_count >= max_evals:
            while q:
                m00, f00, f11, ind, weight = heapq.heappop(q)[2]
                dvalues[ind] += (f11 - f00) * weight
            break
        batch_args, batch_masks = [], []
        while q and len(batch_masks) < batch_size and eval_count + len(batch_masks) < max_evals:
            m00, f00, f11, ind, weight = heapq.heappop(q)[2]
            if ind < features:  # a leaf
                dvalues[ind] += (f11 - f00) * weight
                continue
            lind, rind = (int(c) for c in clustering[ind - features, :2])
            m10, m01 = m00 | masks[lind], m00 | masks[rind]
            batch_args.append((m00, m10, m01, f00, f11, ind, lind, rind, weight))
            batch_masks += [m10, m01]
        if batch_args:
            fout = fm(batch_masks)
            eval_count += len(batch_masks)
        for i, (m00, m10, m01, f00, f11, ind, lind, rind, weight) in enumerate(batch_args):
            f10, f01 = fout[2 * i], fout[2 * i + 1]
            new_weight = weight / 2 if fixed_context is None else weight
            if fixed_context == 0:
                dvalues[ind] += (f11 - f10 - f01 + f00) * weight
            elif fixed_context == 1:
                dvalues[ind] -= (f11 - f10 - f01 + f00) * weight
            pushes = []
            if fixed_context in (None, 0):
                pushes += [(m00, f00, f10, lind), (m00, f00, f01, rind)]
            if fixed_context in (None, 1):
                pushes += [(m01, f01, f11, lind), (m10, f10, f11, rind)]
            for low_mask, low, high, node in pushes:
                heapq.heappush(q, (-abs(high - low) * new_weight, next(counter),
                                   (low_mask, low, high, node, new_weight)))
    values = dvalues.copy()
    lower_credit(len(dvalues) - 1, 0.0, features, values, clustering)
    return torch.from_numpy(values[:features]).view(height, width, channels).permute(2, 0, 1)


def owen_values_of(model, x, target, **options):
    """The per-value (B, C, H, W) Owen values before the sum over channels."""
    explainer = PartitionSHAP(model)
    merged = {key: value for key, value in explainer.resolved_options(**options).items()
              if key not in ("score", "amp", "channels_last")}
    with torch.no_grad():
        return explainer._owen_values(x, resolve_target(target, x.shape[0], x.device), **merged)


@pytest.fixture
def setup():
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("options", [
    {"max_evals": 60},
    {"max_evals": 151, "evals_per_step": 3, "baseline": "blur(4,3)"},
    {"max_evals": 120, "fixed_context": 0, "evals_per_step": 16},
    {"max_evals": 90, "fixed_context": 1, "baseline": 0.3},
])
def test_equals_shaps_algorithm_written_out(setup, options):
    """Every value of every image, with budgets that stop the search part way (an odd image: 7 x 5 x 3)."""
    model, x = setup
    ours = owen_values_of(model, x, [1, 3], **options)
    fill = masking_image(x, options.get("baseline", "blur(128,128)"))
    for i, cls in enumerate([1, 3]):
        reference = shap_partition_values(model, x[i], fill[i], cls, options["max_evals"],
                                          options.get("fixed_context"), options.get("evals_per_step", 10))
        torch.testing.assert_close(ours[i], reference, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(PartitionSHAP(model)(x, [1, 3], **options), ours.sum(1, keepdim=True))


def test_the_tree_is_shaps_mirrored_halving():
    """shap records the leaf of flat index f as feature M - 1 - f: the smaller half of an odd axis is the upper one,
    and it is the left child."""
    left, right = split_boxes(torch.tensor([[0, 5, 0, 4, 0, 3], [0, 1, 0, 1, 0, 3]]))
    assert left.tolist() == [[3, 5, 0, 4, 0, 3], [0, 1, 0, 1, 2, 3]]
    assert right.tolist() == [[0, 3, 0, 4, 0, 3], [0, 1, 0, 1, 0, 2]]
    clustering = shap_image_clustering(5, 4, 3)
    root_left = node_masks(clustering)[int(clustering[-1, 0])].reshape(5, 4, 3)
    assert root_left[3:].all() and not root_left[:3].any()


def test_full_search_gives_owen_values_by_their_definition():
    """With the whole tree searched, each value's mean marginal contribution over the orderings in which every
    node of the hierarchy is contiguous (2^(M-1) of them for M = 12 values)."""
    model = tiny_cnn().double()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fill = masking_image(x, "blur(128,128)")[0]
    clustering = shap_image_clustering(2, 2, 3)
    features = 12

    def orders(node):
        if node < features:
            return [(node,)]
        left, right = (orders(int(c)) for c in clustering[node - features, :2])
        return [a + b for a in left for b in right] + [b + a for a in left for b in right]

    codes = torch.arange(1 << features)
    kept = ((codes[:, None] >> torch.arange(features)) & 1).bool()  # feature f = flat (H, W, C) index
    rows = torch.where(kept, x[0].permute(1, 2, 0).reshape(-1), fill.permute(1, 2, 0).reshape(-1))
    with torch.no_grad():
        value = model(rows.view(-1, 2, 2, 3).permute(0, 3, 1, 2))[:, 2]
    phi = torch.zeros(features, dtype=torch.float64)
    every = orders(2 * features - 2)
    for order in every:
        code = 0
        for f in order:
            phi[f] += value[code | 1 << f] - value[code]
            code |= 1 << f
    phi = (phi / len(every)).view(2, 2, 3).permute(2, 0, 1)
    ours = owen_values_of(model, x, 2, max_evals=10_000, evals_per_step=64)
    torch.testing.assert_close(ours[0], phi, rtol=1e-9, atol=1e-14)


def test_full_search_on_an_additive_model_gives_exact_shapley_values():
    """f = <w, x> + c: every value's Shapley (and Owen) value is w_i (x_i - b_i)."""
    model = LinearModel(shape=(3, 4, 4)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = owen_values_of(model, x, [1, 3], max_evals=10_000, evals_per_step=512, baseline=0.25)
    exact = model.linear.weight.detach()[[1, 3]].view(2, 3, 4, 4) * (x - 0.25)
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(PartitionSHAP(model, baseline=0.25, max_evals=10_000, evals_per_step=512)(x, [1, 3]),
                               exact.sum(1, keepdim=True), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("fixed_context", [None, 0, 1])
def test_values_sum_to_the_score_change_for_every_budget(setup, fixed_context):
    model, x = setup
    with torch.no_grad():
        change = model(x)[[0, 1], [4, 0]] - model(box_blur(x, 128, 128))[[0, 1], [4, 0]]
    for max_evals in (2, 12, 97, 500, 20_000):  # 20 000: the whole tree of 105 values
        maps = PartitionSHAP(model, fixed_context=fixed_context)(x, [4, 0], max_evals=max_evals, evals_per_step=64)
        torch.testing.assert_close(maps.sum((1, 2, 3)), change, rtol=1e-9, atol=1e-14)


def test_defaults_are_shaps():
    """max_evals=500, both contexts, shap's batch of 10 evaluations for the Image masker, blur(128,128); 500 forwards
    per image: the image and its blurred copy, then 2, 8 and 10 at a time."""
    assert PartitionSHAP.defaults == {"max_evals": 500, "fixed_context": None, "evals_per_step": 10,
                                      "baseline": "blur(128,128)"}
    model = CountingModel()
    PartitionSHAP(model)(torch.randn(1, 3, 32, 32), 0, batch_size=10_000)
    assert sum(model.calls) == 500 and model.calls[:3] == [2, 2, 8] and max(model.calls) == 10


def test_blur_is_opencvs_box_filter():
    """cv2.blur(image, (kw, kh)): a centred box, reflect-101 border, also when the kernel is wider than the image."""
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(2, 3, 21, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for spec, kernel in (("blur(128,128)", (128, 128)), ("blur(4, 7)", (4, 7)), ("blur(1,2)", (1, 2))):
        ours = masking_image(x, spec)
        for image, mine in zip(x, ours):
            theirs = cv2.blur(image.permute(1, 2, 0).numpy(), kernel)
            torch.testing.assert_close(mine.permute(1, 2, 0), torch.from_numpy(theirs), rtol=1e-12, atol=1e-12)


def test_batch_and_batch_size_independence(setup):
    model, x = setup
    explainer = PartitionSHAP(model, max_evals=80)
    together = explainer(x, [2, 1])
    alone = torch.cat([explainer(x[i:i + 1], t) for i, t in enumerate([2, 1])])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-15)
    for batch_size in (1, 7):
        torch.testing.assert_close(explainer(x, [2, 1], batch_size=batch_size), together, rtol=1e-10, atol=1e-15)


def test_create_graph_is_the_derivative_of_the_map(setup):
    model, x = setup
    explainer = PartitionSHAP(model, max_evals=40)
    weight = model[-1].weight
    direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(4))
    maps = explainer(x, [1, 2], create_graph=True)
    grad = torch.autograd.grad(maps.square().sum(), weight)[0]
    numeric = central_difference(lambda: explainer(x, [1, 2]).square().sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("bad, error, message", [
    ({"max_evals": 1}, ValueError, "max_evals must be an int >= 2"),
    ({"max_evals": 50.0}, ValueError, "max_evals must be an int >= 2"),
    ({"max_evals": True}, ValueError, "max_evals must be an int >= 2"),
    ({"fixed_context": 2}, ValueError, "fixed_context must be None, 0 or 1"),
    ({"fixed_context": True}, ValueError, "fixed_context must be None, 0 or 1"),
    ({"evals_per_step": 0}, ValueError, "evals_per_step must be a positive int"),
    ({"baseline": "inpaint_telea"}, ValueError, "'inpaint_telea'.*not supported"),
    ({"baseline": "blur(0,3)"}, ValueError, "positive kernel sizes"),
    ({"baseline": "smudge"}, ValueError, "baseline must be 'blur"),
    ({"baseline": torch.zeros(2, 2)}, ValueError, "does not broadcast"),
    ({"max_eval": 5}, TypeError, "did you mean 'max_evals'"),
])
def test_bad_options_are_named(setup, bad, error, message):
    model, x = setup
    with pytest.raises(error, match=message):
        PartitionSHAP(model)(x, 0, **bad)


@pytest.mark.parametrize("options", [{"max_evals": 300, "batch_size": "auto"},
                                     {"max_evals": 200, "batch_size": 24, "fixed_context": 1}])
def test_equals_the_shap_package(setup, options):
    """shap.PartitionExplainer with shap.maskers.Image('blur(128,128)', (H, W, C)) and outputs=[target]."""
    shap = pytest.importorskip("shap")
    model, x = setup

    def predict(batch):
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(batch, dtype=np.float64)).permute(0, 3, 1, 2)).numpy()

    explainer = shap.PartitionExplainer(predict, shap.maskers.Image("blur(128,128)", (7, 5, 3)))
    step = 10 if options["batch_size"] == "auto" else options["batch_size"]
    ours = owen_values_of(model, x, [4, 2], max_evals=options["max_evals"], evals_per_step=step,
                          fixed_context=options.get("fixed_context"))
    for i, cls in enumerate([4, 2]):
        theirs = explainer(x[i:i + 1].permute(0, 2, 3, 1).numpy(), outputs=np.array([cls]), silent=True, **options)
        torch.testing.assert_close(ours[i], torch.from_numpy(theirs.values[0, ..., 0]).permute(2, 0, 1),
                                   rtol=1e-9, atol=1e-15)
