"""CAM cost against its floor and against pytorch-grad-cam (a measurement, not a test).

    python benchmarks/bench_cam.py [--device cpu|cuda] [--batch 8] [--repeats 3] [--ablation]

Floors, measured in the same run:
  * Grad-CAM: one forward of the batch plus ``torch.autograd.grad(score, layer4_output)``, the least any Grad-CAM
    can do; ours and pytorch-grad-cam's ``GradCAM`` are timed on the same ResNet-50 (random weights), layer4.
  * Ablation-CAM (``--ablation``): the C = 2048 tail passes (avgpool + fc on ablated copies of layer4's output)
    per image, run directly on a pre-computed activation; ours runs one forward and then those tail passes.
Reports the median of ``--repeats`` runs after a warm-up.  On a shared CPU, export OMP_WAIT_POLICY=PASSIVE.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attribution as A


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ablation", action="store_true", help="also time Ablation-CAM (2048 tail passes/image)")
    args = parser.parse_args()
    import torchvision

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    classes = model(x).argmax(1)
    rows = torch.arange(args.batch, device=device)

    def floor() -> None:
        store = {}
        handle = model.layer4.register_forward_hook(lambda m, i, o: store.update(a=o))
        out = model(x)
        handle.remove()
        torch.autograd.grad(out[rows, classes].sum(), store["a"])

    ours = A.GradCAM(model, "layer4")
    results = {"floor: forward + grad to layer4": timed(floor, args.repeats, sync),
               "attribution.GradCAM": timed(lambda: ours(x, classes), args.repeats, sync)}
    try:
        from pytorch_grad_cam import GradCAM as TheirGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        theirs = TheirGradCAM(model=model, target_layers=[model.layer4])
        results["pytorch_grad_cam.GradCAM"] = timed(lambda: theirs(input_tensor=x, targets=targets),
                                                    args.repeats, sync)
        theirs.activations_and_grads.release()
    except ImportError:
        pass
    base = results["floor: forward + grad to layer4"]
    print(f"ResNet-50, batch {args.batch}, {args.size}x{args.size}, {device}, {torch.get_num_threads()} threads")
    for name, seconds in results.items():
        print(f"  {name:34s} {seconds:8.3f} s  {seconds / base:5.2f}x floor")

    if args.ablation:
        from attribution.cam.tail import ablation_rows

        with torch.no_grad():
            acts = model.layer4(model.layer3(model.layer2(model.layer1(
                model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        channels = acts.shape[1]
        chunk = max(16, (1 << 26) // (acts[0].numel() * acts.element_size()))

        def tail_floor() -> None:
            with torch.no_grad():
                for start in range(0, args.batch * channels, chunk):
                    index = torch.arange(start, min(start + chunk, args.batch * channels), device=device)
                    ablated = ablation_rows(acts, index // channels, index % channels, 0.0)
                    model.fc(torch.flatten(model.avgpool(ablated), 1))

        explainer = A.AblationCAM(model, "layer4")
        tail = timed(tail_floor, args.repeats, sync)
        mine = timed(lambda: explainer(x, classes), args.repeats, sync)
        print(f"  {'floor: 2048 tail passes/image':34s} {tail:8.3f} s")
        print(f"  {'attribution.AblationCAM':34s} {mine:8.3f} s  {mine / tail:5.2f}x tail floor"
              f" (mode: {explainer.last_mode})")


if __name__ == "__main__":
    main()
