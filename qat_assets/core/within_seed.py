"""The within-seed uncertainty of EMA − live: a paired bootstrap over val images of a trajectory's final weights.

Both methods of a seed share one trajectory, so their final weights, the EMA copy (`ema`) and the live
weights (`baseline`), are scored on the same val images. Resampling those images together
(`image_bootstrap.paired_bootstrap`) gives the spread the choice of val images alone puts on their
difference. That is the within-seed uncertainty. It holds no training noise: another seed trains other
weights, which only the across-seed interval of `paired_statistics` sees.

Cost: no extra validation when the trajectory is trained here. The trainer keeps the per-image statistics of
the last epoch's two validations, which it runs anyway (`ResumableTrainer(record_per_image=True)`), and
they are stored before the lock is released. Only a trajectory whose statistics are missing (trained by
older code, or killed between its last epoch and storing them) validates its final weights again, two val
passes. The bootstrap itself computes mAP50-95 2 × `resamples` times from the stored statistics, on the CPU.

Both live in the trajectory folder, so the second method's run reuses them: `final_per_image.npz` (the
statistics, tied to the trajectory's fingerprint and epoch) and `within_seed.json` (the result, tied to the
statistics file's sha256, its resamples and bootstrap seed; another `within_seed_resamples` recomputes it from
the statistics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from .artifacts import atomic_path, sha256_file, write_json_atomic
from .image_bootstrap import ImageStats, image_arrays, images_from_arrays, paired_bootstrap
from .summary import WithinSeed

IMAGES_FILE = "final_per_image.npz"
RESULT_FILE = "within_seed.json"
WEIGHTS = ("ema", "live")
FROM_TRAINING = "last epoch's validation"
EVALUATED_AGAIN = "evaluated again"


def keep_final_images(
    run_dir: Path, fingerprint: str, epoch: int, per_image: dict[str, list[ImageStats]], source: str = FROM_TRAINING
) -> None:
    """Store the per-image statistics of the EMA copy and the live weights at `epoch` of this trajectory."""
    arrays = {key: value for which in WEIGHTS for key, value in image_arrays(per_image[which], which).items()}
    with atomic_path(Path(run_dir) / IMAGES_FILE) as tmp, open(tmp, "wb") as file:  # a path would gain ".npz"
        np.savez(file, fingerprint=np.array(fingerprint), epoch=np.array(epoch), source=np.array(source), **arrays)


def stored_final_images(run_dir: Path, fingerprint: str, epoch: int) -> tuple[dict[str, list[ImageStats]], str] | None:
    """The stored statistics and their source, when they belong to this trajectory's `epoch`; else None."""
    path = Path(run_dir) / IMAGES_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as arrays:
        if str(arrays["fingerprint"]) != fingerprint or int(arrays["epoch"]) != epoch:
            return None
        return {which: images_from_arrays(arrays, which) for which in WEIGHTS}, str(arrays["source"])


def within_seed_uncertainty(
    run_dir: Path, fingerprint: str, epoch: int, *, resamples: int, seed: int,
    evaluate: Callable[[str], list[ImageStats]], log: Callable[[str], None],
) -> WithinSeed:
    """EMA − live at the trajectory's final `epoch`, by a paired bootstrap over val images; stored and reused.

    `evaluate(which)` scores the final `ema` or `live` weights image by image; it runs only when the trajectory
    holds no statistics of that epoch.
    """
    stored = stored_final_images(run_dir, fingerprint, epoch)
    if stored is None:
        log(f"the trajectory holds no per-image statistics of epoch {epoch}: validating its final EMA and live "
            "weights again (two val passes)")
        stored = {which: evaluate(which) for which in WEIGHTS}, EVALUATED_AGAIN
        keep_final_images(run_dir, fingerprint, epoch, stored[0], EVALUATED_AGAIN)
    images_sha256 = sha256_file(Path(run_dir) / IMAGES_FILE)
    result_path = Path(run_dir) / RESULT_FILE
    saved = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if saved.get("images_sha256") == images_sha256 and (saved["result"]["resamples"], saved["result"]["seed"]) == (
            resamples, seed):
        return WithinSeed(**saved["result"])
    images, source = stored
    paired = paired_bootstrap(images["ema"], images["live"], resamples=resamples, seed=seed)
    result = WithinSeed(
        epoch=epoch, ema_map50_95=paired.first_estimate, live_map50_95=paired.second_estimate,
        difference=paired.estimate, std=paired.std, ci_low=paired.ci_low, ci_high=paired.ci_high,
        unpaired_std=float(np.hypot(paired.first_std, paired.second_std)), images=paired.images,
        resamples=paired.resamples, seed=seed, source=source,
    )
    write_json_atomic(result_path, {"images_sha256": images_sha256, "result": result.model_dump()})
    return result
