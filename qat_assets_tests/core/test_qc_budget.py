"""QC at each profile's default budget wins back at least half of a known per-channel error (issues 9 and 26).

A yolov10n is trained to a plateau on small generated images, quantized to W4A16, its BN statistics re-measured
(`qat_assets_tests/qc_known_error.py`), and then every conv's pre-BN output gets a known per-channel error
h -> g * h + o (folded into the BN, as QC itself folds). QC, run at the profile's default epochs, lr and
batch, must win back at least half of the task loss that the error cost, measured on the calibration
batches (mAP is degenerate at this scale).

Nothing here may depend on bit-exact training (issue 26: the old test trained 80 steps at a constant lr, and
which CPU kernels ran decided whether its "error" cost loss at all). So the start is a plateau, the premise
(the error costs loss) is checked for every error seed with a wide margin, and the claim is statistical:
over 3 error seeds, QC wins back at least half in the majority and on average; the spread is printed.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from qat_assets.core.qc import QCConfig
from qat_assets.core.settings import load_settings
from qat_assets_tests.qc_known_error import IMGSZ, qc_recovery, settled_quantized_model
from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

ERROR_SEEDS = (0, 1, 2)
TRAIN_IMAGES = 64  # the embedded profile's D_c; smoke's 8 images are the first 8 of these (same generator)


@pytest.fixture(scope="module")
def one_thread():
    """A 64 px yolov10n gains little from a second thread, and on a loaded machine oversubscribed threads
    made this test ~30x slower (7 s instead of 0.2 s per training step); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory, one_thread):
    return settled_quantized_model(write_tiny_yolo_set(tmp_path_factory.mktemp("train"), TRAIN_IMAGES, IMGSZ))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("profile", ["smoke", "embedded"])
def test_qc_at_the_default_budget_recovers_half_of_an_injected_channel_error(tmp_path, clean_model, profile):
    settings = load_settings({"profile": profile}, environ={})
    data_yaml = write_tiny_yolo_set(tmp_path, settings.calibration_images, IMGSZ)
    results = []
    for seed in ERROR_SEEDS:
        config = QCConfig(batch=settings.qc_batch, imgsz=IMGSZ, epochs=settings.qc_epochs, lr=settings.qc_lr,
                          optimizer=settings.qc_optimizer, seed=seed)
        result = qc_recovery(clean_model, data_yaml, config, error_seed=seed)
        print(f"{profile} error seed {seed}: clean {result['clean']:.4f}, damaged {result['damaged']:.4f}, "
              f"after QC {result['after']:.4f} ({result['recovered']:.0%} recovered, {result['steps']} steps "
              f"of {config.optimizer} at lr {config.lr:g}){'; ' + result['rejected'] if result['rejected'] else ''}")
        # The premise, for every seed: at a plateau, an error of this size costs loss in every realization
        # (measured: 1.33x to 2.52x the clean loss over the seeds, both profiles and the three kernel families).
        assert result["damaged"] > 1.15 * result["clean"], "the injected error must cost loss, or the test proves nothing"
        # QC starts from exactly the damaged model (its corrections at the identity, its BNs absorbed).
        assert result["before_qc"] == pytest.approx(result["damaged"], rel=1e-3)
        assert result["steps"] == settings.qc_epochs * -(-settings.calibration_images // settings.qc_batch)
        results.append(result["recovered"])
    spread = f"recovered {', '.join(f'{r:.0%}' for r in results)}: mean {statistics.mean(results):.0%}"
    print(f"{profile}: {spread}, min {min(results):.0%}, max {max(results):.0%}")
    assert sum(r >= 0.5 for r in results) > len(results) / 2, spread
    assert statistics.mean(results) >= 0.5, spread
