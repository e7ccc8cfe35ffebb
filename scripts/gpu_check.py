"""GPU self-check: the smoke profile through the real pipeline on one device, timed stage by stage.

    python scripts/gpu_check.py [--device cuda:0] [--variant yolo10n] [--work DIR] [--keep] [--set KEY=VALUE ...]

Runs the stage functions the Dagster assets' workers run (qat_assets/core), in this process, in the
worker's environment: the embedded synthetic set and its calibration subset, FP pretraining, QAT (the `ema`
method, with the oscillation tracker), QC with its fold check and BN re-estimation beside it, then the ONNX
export with its parity checks. Training runs at the precision the `amp` setting resolves to on the device
(`auto`: bf16 on an Ampere or newer GPU, fp32 on the CPU), with PyTorch's default TF32 flags, as a real run.

Prints, per stage: status, seconds, peak memory (the GPU's, from PyTorch's allocator; on the CPU the process's
peak RSS, host memory) and GPU utilization sampled with NVML (nvidia-ml-py) when available; and the host syncs
of one QAT optimizer step (core/host_syncs.py; on CUDA also the syncs CUDA's sync debug mode reports).

Exit status 0 when every stage ran and every check held: the QAT run did not diverge, the QC fold check held,
BN re-estimation gave a finite mAP, the export met its parity goals, and the QAT step made at most one host
sync of its own. 1 otherwise. Without a CUDA device it says so and runs the same stages on the CPU.
QAT_* environment variables are ignored (the check is the smoke profile); change a setting with --set.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from qat_assets.execution.worker import WORKER_ENV

for _name, _value in WORKER_ENV.items():  # before torch and Ultralytics are imported: they read some at import
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from qat_assets.core import layout, qat  # noqa: E402
from qat_assets.core.calibration import select_calibration_subset  # noqa: E402
from qat_assets.core.coco import convert_coco_subset  # noqa: E402
from qat_assets.core.export_stage import run_export_stage  # noqa: E402
from qat_assets.core.host_syncs import HostSyncCount, count_host_syncs, optimizer_host_state  # noqa: E402
from qat_assets.core.pretrain import run_pretrain  # noqa: E402
from qat_assets.core.qat import run_qat  # noqa: E402
from qat_assets.core.qc_stage import run_qc_stage  # noqa: E402
from qat_assets.core.requests import ExportRequest, PretrainRequest, QATRequest, QCRequest  # noqa: E402
from qat_assets.core.settings import Settings, SettingsError, load_settings  # noqa: E402
from qat_assets.core.synthetic import write_synthetic_coco  # noqa: E402
from qat_assets.core.trainer import resolve_precision  # noqa: E402

METHOD, SEED = "ema", 0  # the method under study; one seed is all a check needs
FOLD_GOAL = 1e-4  # run_qc's own tolerance (core/qc.py), checked again on the recorded value
SYNC_GOAL = 1  # issue 22: at most one host sync of our own per QAT optimizer step (the divergence check)
TIME_GOAL_SECONDS = 600
SAMPLE_SECONDS = 0.2  # NVML averages utilization over its own 1/6-1 s window; sampling faster adds nothing
NO_NVML = "not sampled: pip install nvidia-ml-py"
STAGES = ("dataset (synthetic set, subset, calibration)", "FP pretraining", "QAT (ema, oscillation tracker)",
          "QC + fold check + BN re-estimation", "ONNX export + parity")


@dataclass
class StageReport:
    name: str
    status: str = "not run"
    seconds: float | None = None
    memory: str = "-"
    utilization: str = "-"
    failures: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # checks the stage's outcome left without anything to check


class UtilizationSampler:
    """GPU utilization (% of time a kernel ran, NVML) sampled in a background thread while a stage runs."""

    def __init__(self, device: str):
        self.handle, self.reason, self._nvml = None, None, None
        if not device.startswith("cuda"):
            self.reason = "no GPU"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = NO_NVML
            return
        try:
            pynvml.nvmlInit()
            self.handle = nvml_handle(pynvml, torch.device(device).index or 0)
            self._nvml = pynvml
        except Exception as exc:  # no driver, no permission: the check runs on without it
            self.reason = f"not sampled: NVML failed ({exc})"

    @contextlib.contextmanager
    def sampling(self) -> Iterator[list[int]]:
        samples: list[int] = []
        if self.handle is None:
            yield samples
            return
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_SECONDS):
                samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()

    def describe(self, samples: list[int]) -> str:
        if self.handle is None:
            return self.reason
        if not samples:
            return "no sample (stage shorter than one)"
        return f"mean {sum(samples) / len(samples):.0f} %, max {max(samples)} % ({len(samples)} samples)"


def nvml_handle(pynvml: Any, index: int) -> Any:
    """The NVML handle of torch's cuda:`index`: by UUID, since CUDA_VISIBLE_DEVICES renumbers torch's devices
    but not NVML's."""
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:  # an older torch without `uuid`, a MIG slice: NVML's numbering, right without a mask
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class PeakMemory:
    """Peak memory of one stage: the CUDA allocator's peak (reset per stage), or on the CPU the process's peak
    RSS so far (getrusage cannot be reset, so a stage shows the largest footprint up to its end)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device) if device.startswith("cuda") else None

    def start(self) -> None:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def describe(self) -> str:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            return f"{torch.cuda.max_memory_allocated(self.cuda) / 2**20:.0f} MiB GPU"
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{kib / 2**10:.0f} MiB host RSS"


@dataclass
class SyncCount:
    """Host syncs of one QAT optimizer step, as counted on any device and as CUDA's sync debug mode saw them."""

    count: HostSyncCount | None = None
    cuda_warnings: int | None = None


@contextlib.contextmanager
def counting_one_qat_step(device: str, counted: SyncCount, step: int = 2) -> Iterator[None]:
    """Count the host syncs of the `step`-th training batch of the QAT run (the second: the optimizer's state
    exists by then, as at every later step), with the trainer's own callbacks, the way
    qat_assets_tests/core/test_qat.py does. The QAT stage builds its trainer itself, so the stage's
    `ResumableTrainer` is swapped for a subclass for the duration; only that one batch runs slower."""
    base = qat.ResumableTrainer

    class CountingTrainer(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._batches, self._counting = 0, contextlib.ExitStack()
            self.add_callback("on_train_batch_start", lambda trainer: trainer._start_counting())
            self.add_callback("on_train_batch_end", lambda trainer: trainer._counting.close())

        def _start_counting(self) -> None:
            self._batches += 1
            if self._batches != step:
                return
            optimizers = [o for o in (self.optimizer, self.scale_optimizer) if o is not None]
            counted.count = self._counting.enter_context(
                count_host_syncs(lambda: [t for o in optimizers for t in optimizer_host_state(o)]))
            if device.startswith("cuda"):
                caught = self._counting.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                self._counting.callback(torch.cuda.set_sync_debug_mode, "default")
                self._counting.callback(lambda: setattr(counted, "cuda_warnings", sum(
                    "synchroniz" in str(w.message) for w in caught)))

    qat.ResumableTrainer = CountingTrainer
    try:
        yield
    finally:
        qat.ResumableTrainer = base


def describe_syncs(counted: SyncCount) -> tuple[str, list[str]]:
    """The syncs line and, above the goal, the failure naming where they happen."""
    if counted.count is None:
        return "host syncs per QAT step: not counted (the run had fewer than 2 training batches)", []
    ours = counted.count.outside("ultralytics")
    line = (f"host syncs per QAT optimizer step: {len(ours)} of ours (goal <= {SYNC_GOAL}), "
            f"{len(counted.count) - len(ours)} in Ultralytics' loss and progress bar (as in FP training)")
    if counted.cuda_warnings is not None:
        line += f"; CUDA sync debug mode warned {counted.cuda_warnings} times in that step"
    places = "; ".join(f"{n}x {place}" for place, n in HostSyncCount(ours).by_place().items())
    return line, [f"{len(ours)} host syncs of ours in one QAT step: {places}"] if len(ours) > SYNC_GOAL else []


class Check:
    """Runs the stages in order, each measured; a failed stage stops the ones that need its output."""

    def __init__(self, settings: Settings, variant: str, root: Path, device: str, echo: Callable[[str], None]):
        self.settings, self.variant, self.root, self.device, self.echo = settings, variant, root, device, echo
        self.memory, self.sampler = PeakMemory(device), UtilizationSampler(device)
        self.reports: list[StageReport] = []
        self.syncs = SyncCount()

    def stage(self, name: str, run: Callable[[], tuple[Any, list[str]]]) -> Any:
        """Run one stage: `run()` returns its result and the failed checks; an exception fails the stage."""
        report = StageReport(name)
        self.reports.append(report)
        self.echo(f"== {name}")
        self.memory.start()
        started, result = time.perf_counter(), None
        with self.sampler.sampling() as samples:
            try:
                result, report.failures = run()
            except Exception as exc:
                report.failures = [f"{type(exc).__name__}: {exc}"]
                self.echo(traceback.format_exc())
        report.seconds = time.perf_counter() - started
        report.memory, report.utilization = self.memory.describe(), self.sampler.describe(samples)
        report.status = "FAILED" if report.failures else "ok"
        for failure in report.failures:
            self.echo(f"   FAILED: {failure}")
        return None if report.failures else result

    def log(self, line: str) -> None:
        self.echo(f"   {line}")

    def dataset(self) -> tuple[Any, list[str]]:
        """The embedded synthetic set, converted and sampled as the coco_subset and calibration_subset assets do."""
        s = self.settings
        coco = layout.synthetic_coco_dir(self.root)
        write_synthetic_coco(coco, train_images=s.synthetic_train_images, val_images=s.synthetic_val_images,
                             image_size=s.synthetic_image_size, seed=s.subset_seed)
        subset = convert_coco_subset(coco, layout.subset_dir(self.root), train_images=s.train_images,
                                     val_images=s.val_images, seed=s.subset_seed, skip_bad_items=s.skip_bad_items,
                                     source="synthetic", log=self.log)
        calibration = select_calibration_subset(subset, layout.calibration_dir(self.root), size=s.calibration_images,
                                                seed=s.subset_seed)
        return (subset, calibration), []

    def pretrain(self, subset) -> tuple[dict, list[str]]:
        request = PretrainRequest(
            variant=self.variant, dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
            names=subset.class_names, train_images=subset.counts["train"]["images"],
            out_dir=layout.pretrained_dir(self.root, self.variant), settings=self.settings,
        )
        result = run_pretrain(request, log=self.log)
        failures = [] if math.isfinite(result["metrics"]["map50_95"]) else ["the FP evaluation is not finite"]
        return result, failures + self.precision_failures(result)

    def qat(self, subset, pretrained: dict) -> tuple[dict, list[str]]:
        request = QATRequest(
            variant=self.variant, method=METHOD, seed=SEED, pretrained_checkpoint=pretrained["checkpoint"],
            pretrained_sha256=pretrained["sha256"], dataset_yaml=subset.dataset_yaml,
            dataset_fingerprint=subset.fingerprint, train_images=subset.counts["train"]["images"],
            out_dir=layout.run_dir(self.root, self.variant, "qat_checkpoint", METHOD, SEED),
            trajectory_dir=layout.qat_trajectory_dir(self.root, self.variant, SEED), settings=self.settings,
        )
        with counting_one_qat_step(self.device, self.syncs):
            result = run_qat(request, log=self.log)
        failures = self.precision_failures(result)
        if result["diverged_at_epoch"] is not None:
            failures.append(f"QAT diverged in epoch {result['diverged_at_epoch']}")
        elif result["completed_epochs"] != result["planned_epochs"]:
            failures.append(f"QAT completed {result['completed_epochs']} of {result['planned_epochs']} epochs")
        line, sync_failures = describe_syncs(self.syncs)
        self.log(line)
        tracked = [h.get("oscillating_fraction") for h in result["history"] if h["epoch"] > 0]
        if not tracked or any(f is None or not math.isfinite(f) for f in tracked):
            failures.append(f"the oscillation tracker recorded no fraction in some epoch: {tracked}")
        return result, failures + sync_failures

    def qc(self, subset, calibration, trained: dict) -> tuple[dict, list[str]]:
        request = QCRequest(
            variant=self.variant, method=METHOD, seed=SEED, qat_checkpoint=trained["checkpoint"],
            qat_sha256=trained["sha256"], calibration_yaml=calibration.dataset_yaml,
            calibration_fingerprint=calibration.fingerprint, dataset_yaml=subset.dataset_yaml,
            out_dir=layout.run_dir(self.root, self.variant, "qc_checkpoint", METHOD, SEED), settings=self.settings,
        )
        result = run_qc_stage(request, log=self.log)
        if result.get("skipped"):
            return result, [f"QC skipped: {result['skipped']}"]
        failures = []
        # run_qc raises when the fold check fails; a rejected QC folds nothing, so there is nothing to check.
        if result["qc_settings"]["rejected"]:
            self.reports[-1].unchecked.append(
                f"fold check: QC rejected its corrections ({result['qc_settings']['rejected']}), nothing was folded")
        elif not result["max_fold_rel_diff"] < FOLD_GOAL:
            failures.append(f"fold check: folded model differs by {result['max_fold_rel_diff']:.3g} (goal < {FOLD_GOAL:g})")
        else:
            self.log(f"fold check: {result['max_fold_rel_diff']:.2e} relative (goal < {FOLD_GOAL:g}, computed in "
                     f"{result['fold_check_precision']})")
        bn = result["bn_reestimation"]
        if not math.isfinite(bn["map50_95_after"]):
            failures.append(f"BN re-estimation gave mAP50-95 {bn['map50_95_after']}")
        self.log(f"BN re-estimation: {bn['batches']} batches, {bn['seconds']:.1f} s, mAP50-95 {bn['map50_95_before']:.4f} "
                 f"-> {bn['map50_95_after']:.4f}")
        return result, failures

    def export(self, subset, pretrained: dict, trained: dict, corrected: dict) -> tuple[dict, list[str]]:
        source = self.settings.onnx_source
        checkpoint = corrected if source == "qc" else trained
        request = ExportRequest(
            variant=self.variant, method=METHOD, seed=SEED, source=source, checkpoint=checkpoint["checkpoint"],
            checkpoint_sha256=checkpoint["sha256"], pretrained_checkpoint=pretrained["checkpoint"],
            pretrained_sha256=pretrained["sha256"], dataset_yaml=subset.dataset_yaml,
            out_dir=layout.run_dir(self.root, self.variant, "onnx_model", METHOD, SEED), settings=self.settings,
        )
        result = run_export_stage(request, log=self.log)
        if result.get("skipped"):
            return result, [f"export skipped: {result['skipped']}"]
        self.log(f"parity: raw head outputs {result['parity']['max_rel']:.2e} relative per channel; "
                 f"onnxruntime providers {result['runtime'].get('providers', result['runtime'])}")
        if max(result["torch_metrics"]["map50_95"], result["onnx_metrics"]["map50_95"]) == 0:
            self.reports[-1].unchecked.append(
                "mAP parity: PyTorch and onnxruntime both score 0 (the model detects nothing yet), so only the raw "
                "head outputs were compared")
        return result, list(result["failures"])

    def precision_failures(self, result: dict) -> list[str]:
        expected = resolve_precision(self.settings.amp, self.device)
        recorded = result.get("training_precision")
        if recorded is not None and recorded != expected:
            return [f"trained at precision {recorded}, not the {expected} amp={self.settings.amp} gives on {self.device}"]
        return []

    def run(self) -> None:
        dataset, pretraining, training, correction, export = STAGES
        data = self.stage(dataset, self.dataset)
        subset, calibration = data or (None, None)
        pretrained = data and self.stage(pretraining, lambda: self.pretrain(subset))
        trained = pretrained and self.stage(training, lambda: self.qat(subset, pretrained))
        corrected = trained and self.stage(correction, lambda: self.qc(subset, calibration, trained))
        if corrected:
            self.stage(export, lambda: self.export(subset, pretrained, trained, corrected))
        self.reports += [StageReport(name) for name in STAGES[len(self.reports):]]  # after a failed one: not run


def describe_device(device: str, settings: Settings) -> list[str]:
    """What the check runs on, and at which precision."""
    lines = [f"torch {torch.__version__}, device {device}, training precision "
             f"{resolve_precision(settings.amp, device)} (amp={settings.amp})"]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.append(f"GPU {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}; TF32 in cuDNN convolutions "
                     f"{torch.backends.cudnn.allow_tf32}, in matmuls {torch.backends.cuda.matmul.allow_tf32}")
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        lines.append(f"onnxruntime {onnxruntime.__version__}, providers {', '.join(providers)}"
                     + ("" if "CUDAExecutionProvider" in providers or not device.startswith("cuda")
                        else " (ONNX evaluation runs on the CPU: pip install onnxruntime-gpu)"))
    except ImportError:
        lines.append("onnxruntime is not installed: the export stage will fail")
    return lines


def table(reports: list[StageReport]) -> list[str]:
    rows = [("stage", "status", "seconds", "peak memory", "GPU utilization")]
    rows += [(r.name, r.status, "-" if r.seconds is None else f"{r.seconds:.1f}", r.memory, r.utilization)
             for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def parse_set(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[4:]))
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 if CUDA is available, else cpu)")
    parser.add_argument("--variant", default="yolo10n", choices=["yolo10n", "yolo10s", "yolo10m"])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (a temporary one is deleted)")
    parser.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                        help="a setting over the smoke profile, e.g. --set qat_epochs=1 (repeatable)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda:0" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        print(f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda})")
        return 2
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        print(f"--work {args.work} is not empty: the stages would resume from what is there instead of running")
        return 2
    try:
        settings = load_settings({"profile": "smoke", **dict(args.overrides), "device": device}, environ={})
    except SettingsError as exc:
        print(f"--set: {exc}")
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="qat-gpu-check-"))
    settings = settings.model_copy(update={"storage": work})

    def echo(line: str) -> None:
        print(line, flush=True)

    if not cuda:
        echo("no CUDA device: running the same stages on the CPU (this checks the pipeline, not a GPU)")
    elif not device.startswith("cuda"):
        echo(f"a CUDA device is available, but running on {device} as asked")
    for line in describe_device(device, settings):
        echo(line)
    echo(f"work folder {work} ({'kept' if args.keep else 'deleted at the end'})")

    check = Check(settings, args.variant, work, device, echo)
    started = time.perf_counter()
    try:
        check.run()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    echo("")
    for line in table(check.reports):
        echo(line)
    echo(describe_syncs(check.syncs)[0])
    echo(f"total {total:.0f} s" + (f" (over the {TIME_GOAL_SECONDS} s goal)" if total > TIME_GOAL_SECONDS else ""))
    for unchecked in (f"{r.name}: {u}" for r in check.reports for u in r.unchecked):
        echo(f"not checked: {unchecked}")
    failures = [f"{r.name}: {f}" for r in check.reports for f in r.failures]
    if failures:
        echo(f"FAILED ({len(failures)}):")
        for failure in failures:
            echo(f"  - {failure}")
        return 1
    echo(f"PASSED on {device}" + ("" if device.startswith("cuda") else " (no GPU was checked)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
