"""Step-time benchmark: the QAT, FP and QC training steps and the evaluation forwards the ladder runs.

Random tensors, no data loading, so the numbers isolate the cost of fake quantization and of QC's
correction. The FP and QAT steps check for divergence as the trainer does (core/divergence.py), and their
host syncs per step are counted (core/host_syncs.py), split into Ultralytics' (its loss's target assignment,
the same in FP and QAT) and the rest (ours: the divergence check, the quantizer, the oscillation tracker). The collapse diagnostics QAT measures once per epoch (core/diagnostics.py) are timed against a
QAT step and as a share of an epoch. The QAT step includes the oscillation tracker's update after every optimizer step, as QAT
runs it; QC's batch differs from QAT's, so QC is compared per image. All training-side steps are
interleaved in one loop (then the two evaluations in another) and medians are reported, which keeps the
ratios meaningful on a machine shared with other jobs. Each ratio is printed with its two absolute times.

    YOLO_OFFLINE=1 .venv/bin/python benchmarks/bench_qat.py --imgsz 64 --batch 8 --qc-batch 8 --steps 15
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402
from brevitas.nn import QuantConv2d  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from qat_assets.core.quantize import (  # noqa: E402
    QuantOptions,
    freeze_quantized_weights,
    quantize_all,
    quantize_w4a16,
    quantized_modules,
)
from qat_assets.core.divergence import DivergenceWatch  # noqa: E402
from qat_assets.core.host_syncs import HostSyncCount, count_host_syncs  # noqa: E402
from qat_assets.core.diagnostics import FrozenShadow, bn_variance_mismatch, model_summary, weight_code_statistics  # noqa: E402
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


def build_model(nc: int, model_yaml: str = "yolov10n.yaml") -> DetectionModel:
    model = DetectionModel(model_yaml, nc=nc, verbose=False)
    model.args = get_cfg()  # the loss reads its box/cls/dfl gains from here, as in DetectionTrainer
    return model


def train_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], after_step=None):
    """One optimizer step as the trainer takes it, divergence check included; `after_step(model)` runs after it,
    as QAT's tracker does."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    divergence = DivergenceWatch()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        loss = loss.sum()
        loss.backward()
        divergence.add_loss(loss)
        if divergence.read([p.grad for p in model.parameters() if p.grad is not None]) is not None:
            raise RuntimeError("the benchmark's training step diverged")
        optimizer.step()
        if after_step is not None:
            after_step(model)

    return step


def tracked_qat_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], tracker: OscillationTracker):
    """The ladder's QAT step: train step, then the oscillation tracker (whose quantized weights the next forward reuses)."""
    tracker.update_model(model)  # the first call only sets reference values
    return train_step_fn(model, batch, after_step=tracker.update_model)


def brevitas_path_qat_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The QAT step before the weights were shared: Brevitas' own layer forward and a separate tracker pass.

    Same numbers (qat_assets_tests/core/test_step_quant.py); kept here as the in-run reference for the speed-up.
    """
    reference = copy.deepcopy(model)
    for _, module in quantized_modules(reference):
        module.__class__ = QuantConv2d
    tracker = OscillationTracker()

    @torch.no_grad()
    def own_pass(m: torch.nn.Module) -> None:
        for name, module in quantized_modules(m):
            quantized = module.quant_weight()
            if float(quantized.bit_width) <= tracker.max_bit_width:
                tracker.update(name, quantized.int())

    own_pass(reference)
    return train_step_fn(reference, batch, after_step=own_pass)


def qc_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One QC step as `run_qc` takes it: SGD on gamma/beta of the frozen trainee, BNs absorbed."""
    trainee = correction_trainee(model)
    optimizer = prepare_correction_training(trainee, lr=1e-4, optimizer="SGD")

    def step() -> None:
        correction_step(trainee, batch, optimizer)

    return step


def diagnostics_fn(model: torch.nn.Module, images: torch.Tensor, tracker: OscillationTracker):
    """The collapse diagnostics as QAT measures them once per epoch (CollapseDiagnostics.measure, without drawing
    its fixed batch from a dataset: that happens once per run)."""

    shadow = FrozenShadow()

    def step() -> None:
        quantized = quantize_all(model)
        layers = weight_code_statistics(model, quantized)
        bn = bn_variance_mismatch(shadow.of(model, quantized), images)
        model_summary(layers, bn, tracker.layer_statistics())

    return step


def eval_step_fn(model: torch.nn.Module, images: torch.Tensor):
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(images)

    return step


def interleaved_medians(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
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


def syncs_per_step(step: Callable[[], None]) -> HostSyncCount:
    """The host syncs of one call of `step` (after the timed ones: counting slows the step down)."""
    with count_host_syncs() as count:
        step()
    return count


def sync_line(label: str, count: HostSyncCount) -> str:
    ours = len(count.outside("ultralytics"))
    return (f"{label:<34}{ours:>6d}   ours (goal 0-1); Ultralytics' loss and target assignment "
            f"{len(count) - ours}, as in FP")


def ratio_line(label: str, numerator: float, denominator: float, names: tuple[str, str], goal: str = "") -> str:
    """`label: ratio (numerator ms / denominator ms)`, each time per call or per image as the names say."""
    return (f"{label:<34}{numerator / denominator:>6.2f}   {names[0]} {1000 * numerator:8.1f} ms / "
            f"{names[1]} {1000 * denominator:8.1f} ms{'   goal ' + goal if goal else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov10n", choices=["yolov10n", "yolov10s", "yolov10m"])
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="QAT/FP training batch (the embedded profile's)")
    parser.add_argument("--qc-batch", type=int, default=8, help="QC batch (the embedded profile's)")
    parser.add_argument("--steps", type=int, default=7, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the ladder's CPU workers run two at a time on one thread each (2 cores)")
    parser.add_argument("--epoch-steps", type=int, default=32,
                        help="optimizer steps per epoch, to express the once-per-epoch diagnostics as a share of an epoch")
    parser.add_argument("--statistics-scales", action="store_true", help="max-abs scales instead of learned ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    float_model = build_model(nc=3, model_yaml=f"{args.model}.yaml")
    quant_model = copy.deepcopy(float_model)
    report = quantize_w4a16(quant_model, QuantOptions(learned_scales=not args.statistics_scales))
    batch = synthetic_batch(args.batch, args.imgsz)
    qc_batch = synthetic_batch(args.qc_batch, args.imgsz)

    tracker = OscillationTracker()
    fp_step, qat_step = train_step_fn(float_model, batch), tracked_qat_step_fn(quant_model, batch, tracker)
    # One interleaved loop for every training-side step, so each ratio is taken under the same load.
    train = interleaved_medians(
        {
            "fp": fp_step,
            "qat": qat_step,
            "diagnostics": diagnostics_fn(quant_model, batch["img"], tracker),
            "qat before": brevitas_path_qat_step_fn(quant_model, batch),
            "qc": qc_step_fn(quant_model, qc_batch),
        },
        args.warmup,
        args.steps,
    )
    evaluation = interleaved_medians(
        {
            "fp": eval_step_fn(float_model, batch["img"]),
            "w4a16 frozen": eval_step_fn(freeze_quantized_weights(quant_model), batch["img"]),
        },
        args.warmup,
        args.steps,
    )

    print(f"{args.model} nc=3 imgsz={args.imgsz} batch={args.batch} qc_batch={args.qc_batch} threads={args.threads}, "
          f"median of {args.steps} interleaved repeats after {args.warmup} warm-up; convs {report.counts()}, "
          f"{'statistics' if args.statistics_scales else 'learned'} scales; no data loading")
    print(ratio_line("QAT step / FP step", train["qat"], train["fp"], ("QAT+tracker", "FP"), "<= 1.10"))
    print(sync_line("host syncs per QAT step", syncs_per_step(qat_step)))
    print(sync_line("host syncs per FP step", syncs_per_step(fp_step)))
    print(ratio_line("  before: Brevitas path + own pass", train["qat before"], train["fp"], ("QAT+tracker", "FP")))
    qat_per_image, qc_per_image = train["qat"] / args.batch, train["qc"] / args.qc_batch
    print(ratio_line("diagnostics (once/epoch) / QAT step", train["diagnostics"], train["qat"], ("diagnostics", "QAT"))
          + f"   = {train['diagnostics'] / (args.epoch_steps * train['qat']):.4f} of a {args.epoch_steps}-step epoch")
    print(ratio_line("QC / QAT, per image", qc_per_image, qat_per_image, ("QC", "QAT"), "<= 0.40"))
    print(ratio_line("  QC step / QAT step", train["qc"], train["qat"], ("QC", "QAT")))
    print(ratio_line("quantized eval / FP eval", evaluation["w4a16 frozen"], evaluation["fp"], ("W4A16", "FP"),
                     "<= 1.11"))


if __name__ == "__main__":
    main()
