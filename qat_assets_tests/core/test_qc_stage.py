"""QC's "before" evaluation reuses QAT's last evaluation only when it evaluated the same weights the same way."""

from __future__ import annotations

from qat_assets.core.evaluate import evaluation_settings
from qat_assets.core.qc_stage import qat_final_evaluation
from qat_assets.core.settings import load_settings


def qat_sidecar(settings, **changes) -> dict:
    history = [{"epoch": 0, "map50_95": 0.1, "map50": 0.2, "precision": 0.3, "recall": 0.4},
               {"epoch": 1, "map50_95": 0.2, "map50": 0.3, "precision": 0.4, "recall": 0.5},
               {"epoch": 2, "map50_95": 0.37919, "map50": 0.61283, "precision": 0.7, "recall": 0.6}]
    return {"history": history, "planned_epochs": 2, "diverged_at_epoch": None, "device": "cpu",
            "evaluation": evaluation_settings(settings.imgsz, settings.batch), **changes}


def test_reuses_the_last_evaluation_of_a_completed_run_with_the_same_settings():
    settings = load_settings({"profile": "smoke"}, environ={})
    assert qat_final_evaluation(qat_sidecar(settings), settings) == {
        "map50_95": 0.37919, "map50": 0.61283, "precision": 0.7, "recall": 0.6}


def test_evaluates_again_when_settings_differ_or_the_run_did_not_finish():
    settings = load_settings({"profile": "smoke"}, environ={})
    other = evaluation_settings(settings.imgsz * 2, settings.batch)
    assert qat_final_evaluation(qat_sidecar(settings, evaluation=other), settings) is None
    assert qat_final_evaluation(qat_sidecar(settings, planned_epochs=3), settings) is None
    assert qat_final_evaluation(qat_sidecar(settings, diverged_at_epoch=2), settings) is None
    assert qat_final_evaluation(qat_sidecar(settings, history=[{"epoch": 0, "map50_95": 0.1}]), settings) is None


def test_evaluates_again_after_qat_on_a_gpu_whose_validation_ran_under_amp():
    settings = load_settings({"profile": "smoke"}, environ={})
    assert qat_final_evaluation(qat_sidecar(settings, device="cuda:0"), settings) is None


def test_a_sparse_cadence_reuses_the_validated_last_epoch_and_never_an_unvalidated_one():
    settings = load_settings({"profile": "smoke"}, environ={})
    unvalidated = {"map50_95": None, "map50": None, "precision": None, "recall": None}
    sparse = qat_sidecar(settings)
    sparse["history"][1].update(unvalidated)  # qat_val_interval=2: epoch 1 trained without a validation
    assert qat_final_evaluation(sparse, settings) == {"map50_95": 0.37919, "map50": 0.61283, "precision": 0.7, "recall": 0.6}
    sparse["history"][2].update(unvalidated)
    assert qat_final_evaluation(sparse, settings) is None
