"""The run summary of a QAT run validated at a sparse cadence: unvalidated epochs are read, not refused."""

from qat_assets.core.settings import load_settings
from qat_assets.core.verdict import build_run_summary


def sparse_qat_sidecar(settings) -> dict:
    """A 5-epoch history validated at epochs 2, 4, 5 (qat_val_interval=2, final window 2), as run_qat writes it."""
    maps = {0: 0.30, 2: 0.34, 4: 0.36, 5: 0.35}
    history = [
        {"epoch": e, **({"map50_95": maps[e], "map50": 0.5, "precision": 0.5, "recall": 0.5} if e in maps else
                        {"map50_95": None, "map50": None, "precision": None, "recall": None}),
         "box_loss": 1.0, "lr": 1e-4, "oscillating_fraction": 0.01, "seconds": 3.0,
         "validation_seconds": 1.0 if e in maps else None, "diagnostics": None}
        for e in range(6)
    ]
    return {
        "variant": "yolo10n", "method": "ema", "seed": 0, "names": ["a"], "planned_epochs": 5, "completed_epochs": 5,
        "validated_epochs": [2, 4, 5], "diverged_at_epoch": None, "resume": "fresh start", "history": history,
        "ptq_map50_95": 0.30, "fp_map50_95": 0.40, "quantization": {"options": {}, "layers": []},
        "quantization_counts": {"w4": 1}, "ema": {"decay": 0.9}, "evaluation": {}, "dataset_fingerprint": "d",
        "pretrained_sha256": "0" * 64, "profile_fingerprint": "p", "settings": settings.model_dump(mode="json"),
        "device": "cpu", "seconds": 1.0, "sha256": "0" * 64,
    }


def test_the_run_summary_keeps_unvalidated_epochs_and_judges_the_validated_ones():
    settings = load_settings({"profile": "smoke", "stability_window": 2}, environ={})
    summary = build_run_summary(sparse_qat_sidecar(settings), None, partition_key="ema|0", settings=settings,
                                dataset={"fingerprint": "d"})
    assert [r.map50_95 for r in summary.history] == [0.30, None, 0.34, None, 0.36, 0.35]
    qat = summary.stability_qat
    assert qat.status == "completed-success" and (qat.best, qat.best_from_epoch, qat.best_epoch) == (0.355, 4, 5)
    assert (qat.final, qat.final_from_epoch, qat.final_epoch) == (0.355, 4, 5)
