"""`bn_reestimate_every_eval`: a +BN curve per validated epoch, measured on copies, never touching the training."""

import json
from pathlib import Path

import torch

from qat_assets.core import bn_reestimated_validation
from qat_assets.core.artifacts import load_checkpoint
from qat_assets.core.bn_reestimation import batch_norms, reestimate_bn_statistics
from qat_assets.core.qat import method_history, run_qat
from qat_assets.core.requests import QATRequest
from qat_assets.core.settings import load_settings
from qat_assets_tests.execution.test_worker import pretrained  # noqa: F401 (a fixture: a smoke set and a 1-epoch FP yolo10n)

METRICS = ("map50_95", "map50", "precision", "recall")


def request_for(pretrained, tmp_path: Path, name: str, **settings) -> QATRequest:
    root, subset, result = pretrained
    return QATRequest(
        variant="yolo10n", method="ema", seed=0, pretrained_checkpoint=result["checkpoint"],
        pretrained_sha256=result["sha256"], dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
        train_images=16, out_dir=tmp_path / name, trajectory_dir=tmp_path / f"{name}-trajectory",
        settings=load_settings({"profile": "smoke", "storage": str(root), **settings}, environ={}),
    )


def test_every_validation_gets_a_bn_reestimated_twin_and_the_trained_weights_do_not_change(pretrained, tmp_path, monkeypatch):
    reestimated: list[dict] = []  # per call: whether the BN buffers of the copy differ from the trained model's

    def recording_reestimate(model, images, max_batches, log=None):
        before = {name: bn.running_var.clone() for name, bn in batch_norms(model)}
        report = reestimate_bn_statistics(model, images, max_batches, log)
        reestimated.append({"report": report, "moved": any(
            not torch.equal(before[name], bn.running_var) for name, bn in batch_norms(model))})
        return report

    monkeypatch.setattr(bn_reestimated_validation, "reestimate_bn_statistics", recording_reestimate)
    with_bn = run_qat(request_for(pretrained, tmp_path, "with-bn", bn_reestimate_every_eval=True, bn_reestimation_batches=3), log=lambda m: None)
    monkeypatch.undo()
    without = run_qat(request_for(pretrained, tmp_path, "without", bn_reestimate_every_eval=False), log=lambda m: None)

    # The measurement works on copies with its own seeded random state: the training is bit for bit the same.
    state_with, state_without = (load_checkpoint(Path(r["checkpoint"])) for r in (with_bn, without))
    for key in ("model", "ema"):
        assert all(torch.equal(state_with[key][k], state_without[key][k]) for k in state_with[key])
    for a, b in zip(with_bn["history"], without["history"]):
        assert {m: a[m] for m in METRICS} == {m: b[m] for m in METRICS}

    # Smoke QAT validates both of its epochs: per epoch the EMA copy and the live weights, re-estimated on
    # 3 training batches (smoke has 2 an epoch: the dataset is cycled).
    assert len(reestimated) == 2 * load_settings({"profile": "smoke"}, environ={}).qat_epochs
    assert all(r["moved"] and r["report"]["batches"] == 3 for r in reestimated)
    trained = [h for h in with_bn["history"] if h["epoch"] > 0]
    assert all(set(METRICS) <= set(h["bn_reestimated"]) and h["bn_reestimated"]["seconds"] > 0 for h in trained)
    assert all("bn_reestimated" not in h for h in without["history"])

    # The trajectory records both copies; each method's history shows the +BN metrics of the weights it evaluates.
    trajectory = json.loads((tmp_path / "with-bn-trajectory" / "history.json").read_text())
    last = trajectory[-1]["bn_reestimated"]
    assert set(last) == {"ema", "live"}
    assert method_history(trajectory, "ema")[-1]["bn_reestimated"] == last["ema"]
    assert method_history(trajectory, "baseline")[-1]["bn_reestimated"] == last["live"]
