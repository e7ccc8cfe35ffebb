"""Step-time benchmark: FP vs W4A16 QAT training step, oscillation tracking, FP vs quantized evaluation.

Random tensors, no data loading, so the numbers isolate the cost of Brevitas fake quantization. FP and
quantized steps are interleaved and the median is reported, which keeps the ratios meaningful on a
machine shared with other jobs.

    YOLO_OFFLINE=1 /work/venv/bin/python benchmarks/bench_qat.py [--imgsz 160 --batch 32 --steps 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from qat_assets.core.quantize import (  # noqa: E402
    QuantOptions,
    freeze_quantized_weights,
    quantize_w4a16,
    quantized_modules,
)
from qat_assets.core.oscillation import OscillationTracker  # noqa: E402
from qat_assets.core.qc import correction_step, correction_trainee, prepare_correction_training  # noqa: E402


def synthetic_batch(batch: int, imgsz: int, boxes_per_image: int = 4, nc: int = 3) -> dict[str, torch.Tensor]:
    """A batch shaped like DetectionTrainer.preprocess_batch output: float images, normalized xywh boxes."""
    generator = torch.Generator().manual_seed(0)
    count = batch * boxes_per_image
    centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator) * 0.2 + 0.1
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=generator),
        "cls": torch.randint(0, nc, (count, 1), generator=generator).float(),
        "bboxes": torch.cat([centers, sizes], dim=1),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float(),
    }


def build_model(nc: int) -> DetectionModel:
    model = DetectionModel("yolov10n.yaml", nc=nc, verbose=False)
    model.args = get_cfg()  # the loss reads its box/cls/dfl gains from here, as in DetectionTrainer
    return model


def train_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        loss.sum().backward()
        optimizer.step()

    return step


def weight_quant_step_fn(model: torch.nn.Module):
    """Fake-quantize every quantized conv's weights and back-propagate through it, without any conv.

    This is the part of the QAT overhead that does not depend on batch size or image size.
    """
    modules = [module for _, module in quantized_modules(model)]

    def step() -> None:
        sum(module.quant_weight().value.sum() for module in modules).backward()

    return step


def qc_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One QC step as `run_qc` takes it: Adam on gamma/beta of the frozen trainee, BNs absorbed."""
    trainee = correction_trainee(model)
    optimizer = prepare_correction_training(trainee, lr=1e-4)

    def step() -> None:
        correction_step(trainee, batch, optimizer)

    return step


def oscillation_step_fn(model: torch.nn.Module):
    """What QAT adds after every optimizer step: one tracker update over the <= 4-bit layers."""
    tracker = OscillationTracker()
    tracker.update_model(model)  # the first call only sets reference values

    def step() -> None:
        tracker.update_model(model)

    return step


def eval_step_fn(model: torch.nn.Module, images: torch.Tensor):
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(images)

    return step


def interleaved_medians(steps: dict[str, callable], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each step, calling them in turn so load changes hit all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--statistics-scales", action="store_true", help="max-abs scales instead of learned ones")
    parser.add_argument("--qc", action="store_true", help="also time a QC step against the QAT step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    float_model = build_model(nc=3)
    quant_model = copy.deepcopy(float_model)
    report = quantize_w4a16(quant_model, QuantOptions(learned_scales=not args.statistics_scales))
    batch = synthetic_batch(args.batch, args.imgsz)

    train = interleaved_medians(
        {
            "fp": train_step_fn(float_model, batch),
            "w4a16": train_step_fn(quant_model, batch),
            "weight quant only": weight_quant_step_fn(quant_model),
            "oscillation tracking": oscillation_step_fn(quant_model),
        },
        args.warmup,
        args.steps,
    )
    frozen_model = freeze_quantized_weights(quant_model)
    evaluation = interleaved_medians(
        {
            "fp": eval_step_fn(float_model, batch["img"]),
            "w4a16": eval_step_fn(quant_model, batch["img"]),
            "w4a16 frozen": eval_step_fn(frozen_model, batch["img"]),
        },
        args.warmup,
        args.steps,
    )

    print(f"yolov10n nc=3 imgsz={args.imgsz} batch={args.batch} threads={args.threads} "
          f"median of {args.steps} after {args.warmup} warm-up; convs {report.counts()}, "
          f"{'statistics' if args.statistics_scales else 'learned'} scales")
    print(f"{'measurement':<28}{'value':>14}{'vs FP':>10}{'goal':>10}")
    print(f"{'train step FP':<28}{train['fp']:>12.3f} s{1.0:>10.2f}")
    print(f"{'train step W4A16 QAT':<28}{train['w4a16']:>12.3f} s{train['w4a16'] / train['fp']:>10.2f}{'<= 1.15':>10}")
    print(f"{'  of which weight fake-quant':<28}{train['weight quant only']:>12.3f} s"
          f"{train['weight quant only'] / train['fp']:>10.2f}")
    print(f"{'oscillation tracker update':<28}{train['oscillation tracking']:>12.3f} s"
          f"{train['oscillation tracking'] / train['fp']:>10.2f}"
          f"   ({train['oscillation tracking'] / train['w4a16']:.3f} x the QAT step)")
    fp_throughput = args.batch / evaluation["fp"]
    for name in ("fp", "w4a16", "w4a16 frozen"):
        throughput = args.batch / evaluation[name]
        goal = "" if name == "fp" else ">= 0.90"
        print(f"{'eval ' + name:<28}{throughput:>10.1f} img/s{throughput / fp_throughput:>10.2f}{goal:>10}")


    if args.qc:
        # Interleaved with QAT steps on the same model and batch, so the ratio survives a loaded machine.
        qc = interleaved_medians(
            {"qat": train_step_fn(quant_model, batch), "qc": qc_step_fn(quant_model, batch)}, args.warmup, args.steps
        )
        print(f"{'measurement':<28}{'value':>14}{'vs QAT':>10}{'goal':>10}")
        print(f"{'train step W4A16 QAT':<28}{qc['qat']:>12.3f} s{1.0:>10.2f}")
        print(f"{'QC step (gamma/beta only)':<28}{qc['qc']:>12.3f} s{qc['qc'] / qc['qat']:>10.2f}{'<= 0.50':>10}")

if __name__ == "__main__":
    main()
