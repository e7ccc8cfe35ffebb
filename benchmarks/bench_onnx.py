"""What the W4 file buys in onnxruntime: FP32 vs QCDQ W4 vs INT4 W4, latency, peak memory, file size.

The three files are those `{v}/onnx_model` writes (fp32.onnx, w4a16_qcdq.onnx, w4a16_int4.onnx): pass the
run's folder with --onnx-dir, or let the script export them from a freshly initialised yolov10n (80 classes),
which costs the same per image (weight values do not change any op's cost). The sessions are timed
round-robin in one process (median over --runs of each (file, batch)), so ratios against FP32 hold on a
shared machine; peak RSS is measured per file in a child process that only loads and runs that file.

    YOLO_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py --imgsz 64 --runs 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

FILES = {"FP32": "fp32.onnx", "W4 QCDQ": "w4a16_qcdq.onnx", "W4 INT4": "w4a16_int4.onnx"}


def export_files(folder: Path, imgsz: int) -> None:
    """The three files of a freshly initialised yolov10n, exported the way the export stage does."""
    import onnx
    import torch

    from qat_assets.core import onnx_export
    from qat_assets.core.models import build_detection_model
    from qat_assets.core.quantize import QuantOptions, quantize_w4a16

    torch.manual_seed(0)
    names = [f"class{i}" for i in range(80)]
    shape = dict(imgsz=imgsz, opset=17, max_det=300)
    onnx_export.export_float(build_detection_model("yolo10n", names).eval(), folder / FILES["FP32"], **shape)
    model = build_detection_model("yolo10n", names)
    quantize_w4a16(model, QuantOptions())
    qcdq = onnx_export.export_quantized(model.eval(), folder / FILES["W4 QCDQ"], **shape)
    onnx_export.save_graph(folder / FILES["W4 INT4"], onnx_export.int4_storage(onnx.load(str(qcdq))))


def session(path: Path, provider: str) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=[provider])


def peak_rss_mb(path: Path, provider: str, imgsz: int, batch: int) -> float:
    """Peak resident memory of a fresh process that loads `path` and runs one batch (interpreter included).

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child started from this
    process would report this process' peak."""
    code = (
        "import numpy as np, onnxruntime as ort\n"
        "o = ort.SessionOptions(); o.log_severity_level = 3\n"
        f"s = ort.InferenceSession({str(path)!r}, o, providers=[{provider!r}])\n"
        f"s.run(None, {{'images': np.random.rand({batch}, 3, {imgsz}, {imgsz}).astype(np.float32)}})\n"
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx-dir", type=Path, help="an onnx_model run folder; default: export a fresh yolov10n")
    parser.add_argument("--imgsz", type=int, help="image size; default: the profile's (QAT_PROFILE)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if args.imgsz is None:
        from qat_assets.core.settings import load_settings

        args.imgsz = load_settings().imgsz
    batches = [int(b) for b in args.batches.split(",")]
    scratch = tempfile.TemporaryDirectory(prefix="bench_onnx-")
    folder = args.onnx_dir or Path(scratch.name)
    if args.onnx_dir is None:
        print(f"exporting FP32, QCDQ and INT4 files of a fresh yolov10n at {args.imgsz} px to {folder}")
        export_files(folder, args.imgsz)
    missing = [name for name in FILES.values() if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"{folder} has no {', '.join(missing)}; point --onnx-dir at an onnx_model run folder")

    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in onnxruntime.get_available_providers()]
    print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, imgsz {args.imgsz}, "
          f"median of {args.runs} runs, providers {providers}")
    for provider in providers:
        sessions = {label: session(folder / name, provider) for label, name in FILES.items()}
        inputs = {b: {"images": np.random.default_rng(0).random((b, 3, args.imgsz, args.imgsz), np.float32)} for b in batches}
        times: dict[tuple[str, int], list[float]] = {(label, b): [] for label in FILES for b in batches}
        for label in FILES:  # warm-up: first runs allocate and pick kernels
            for b in batches:
                sessions[label].run(None, inputs[b])
        for _ in range(args.runs):  # round-robin, so a busy moment on a shared machine hits every file alike
            for label in FILES:
                for b in batches:
                    start = time.perf_counter()
                    sessions[label].run(None, inputs[b])
                    times[label, b].append((time.perf_counter() - start) / b)
        print(f"\n{provider}")
        print(f"{'file':10s} {'MB':>6s} " + " ".join(f"{f'ms/img b{b}':>11s} {'vs FP32':>7s}" for b in batches)
              + f" {'peak RSS MB':>11s} {'vs FP32':>7s}")
        fp_rss = None
        for label, name in FILES.items():
            rss = peak_rss_mb(folder / name, provider, args.imgsz, max(batches))
            fp_rss = fp_rss or rss
            cells = []
            for b in batches:
                median = statistics.median(times[label, b])
                cells.append(f"{1e3 * median:11.3f} {median / statistics.median(times['FP32', b]):7.2f}")
            size = (folder / name).stat().st_size / 1e6
            print(f"{label:10s} {size:6.2f} " + " ".join(cells) + f" {rss:11.0f} {rss / fp_rss:7.2f}")


if __name__ == "__main__":
    main()
