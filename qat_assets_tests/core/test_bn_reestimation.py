"""BN re-estimation: against its equation, restoring corrupted statistics of a real yolov10n, and, on a trained
float yolov10n, the known answer (a converged model keeps its mAP) and the effect (corrupted variances are won back)."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.bn_reestimation import batch_norms, reestimate_bn_statistics
from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.qc_stage import run_bn_reestimation
from qat_assets.core.requests import QCRequest
from qat_assets.core.settings import load_settings


def batches(count: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) * (1 + i) for i in range(count)]


def test_running_statistics_equal_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.1)
    model = nn.Sequential(conv, bn).eval()
    data = batches(4, (6, 3, 8, 8))
    with torch.no_grad():
        outputs = [conv(x) for x in data]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outputs])

    report = reestimate_bn_statistics(model, iter(data), max_batches=10)
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-5)
    assert report["batches"] == 4 and report["images"] == 24
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored

    reestimate_bn_statistics(model, iter(data), max_batches=2)  # only the first two batches count
    assert torch.allclose(bn.running_mean, means[:2].mean(0), atol=1e-6)


def test_reestimation_restores_the_outputs_of_a_model_whose_statistics_were_corrupted():
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    data = batches(3, (4, 3, 64, 64), seed=1)
    reestimate_bn_statistics(model, iter(data), max_batches=3)  # the statistics these weights should have
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        reference = model(probe)[0]
        generator = torch.Generator().manual_seed(3)
        for _, bn in batch_norms(model):  # what oscillating QAT leaves behind: stale, shifted statistics
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=generator) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.3, 3, generator=generator))
        corrupted = model(probe)[0]
    assert (corrupted - reference).abs().max() > 0.1 * reference.abs().max()

    reestimate_bn_statistics(model, iter(data), max_batches=3)
    with torch.no_grad():
        restored = model(probe)[0]
    assert torch.allclose(restored, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_no_batches_is_a_clear_error_and_leaves_the_statistics_alone():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(0.5)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn_statistics(nn.Sequential(bn), iter([]), max_batches=5)
    assert torch.equal(bn.running_mean, torch.full((2,), 0.5))


# --- Known answer and effect on a trained float model, through the QC stage's own re-estimation path ---

IMGSZ = 64
# Batches of 16, the whole set: at 64 px the deepest maps are 2x2, so a batch of 8 gives their BNs 32 samples.
SETTLE_BATCH = 16
# How far re-estimation may move a converged model's mAP50-95. The issue asks 0.01 on the embedded set (64 val
# images); on these 16 images the metric itself moves more: a model like this one, re-estimated with 50 batches of
# 8 and six seeds, moved -0.024..+0.009, and this test's model with 200 batches of 16 +0.014. The bug this test
# guards against, the val-mode loader, moved it by -0.074 (on an embedded yolov10s -0.117).
KNOWN_ANSWER_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def converged_float_model(tmp_path_factory):
    """A yolov10n trained in float on 16 generated 64 px images through Ultralytics' training transforms, with BN
    running statistics that have converged for its final weights under those transforms.

    The training pipeline is built here from Ultralytics directly (mode "train", the QAT hyperparameters' defaults
    with mosaic closed, as in a run's last epochs), not through core/bn_reestimation_data.py, so a wrong pipeline
    there cannot agree with its own reference. Adam with the LR annealed to 2 %, then the statistics the training
    converges to once the LR reaches ~0: the average batch statistics under the training transforms, measured
    over 300 batches of 16 (BN momentum None). At Ultralytics' momentum 0.03 the same average carries the noise of
    ~66 batches, which would be most of what the test measures.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from qat_assets.core.qc import attach_task_loss
    from qat_assets.core.trainer import preserved_random_state
    from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

    data_yaml = write_tiny_yolo_set(tmp_path_factory.mktemp("bn-known-answer"), 16, IMGSZ)
    hyp = get_cfg(overrides=dict(imgsz=IMGSZ, batch=8, mosaic=0.0))
    data = check_det_dataset(data_yaml, autodownload=False)
    dataset = build_yolo_dataset(hyp, data["train"], 8, data, mode="train", rect=False, stride=32)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, shuffle=True, collate_fn=dataset.collate_fn, generator=torch.Generator().manual_seed(0)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64 px yolov10n gains little from a second thread (see test_qc_budget.py)
    try:
        with preserved_random_state():
            random.seed(0)
            torch.manual_seed(0)
            model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
            attach_task_loss(model)
            steps = 150
            optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(1 - step / steps, 0.02))
            model.train()
            batches = itertools.chain.from_iterable(map(iter, itertools.repeat(loader)))
            for batch in itertools.islice(batches, steps):
                loss, _ = model.loss({**batch, "img": batch["img"].float() / 255})
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
                schedule.step()
            settle = torch.utils.data.DataLoader(
                dataset, batch_size=SETTLE_BATCH, shuffle=True, collate_fn=dataset.collate_fn,
                generator=torch.Generator().manual_seed(1),
            )
            momenta = {bn: bn.momentum for _, bn in batch_norms(model)}
            for bn in momenta:
                bn.reset_running_stats()
                bn.momentum = None
            with torch.no_grad():
                for batch in itertools.islice(itertools.chain.from_iterable(map(iter, itertools.repeat(settle))), 300):
                    model(batch["img"].float() / 255)
            for bn, momentum in momenta.items():
                bn.momentum = momentum
    finally:
        torch.set_num_threads(threads)
    return model.eval(), Path(data_yaml)


def reestimation_request(data_yaml: Path, tmp_path: Path) -> QCRequest:
    settings = load_settings(
        {"profile": "smoke", "imgsz": IMGSZ, "batch": SETTLE_BATCH, "bn_reestimation_batches": 200}, environ={}
    )
    return QCRequest(
        variant="yolo10n", method="ema", seed=0, qat_checkpoint=tmp_path / "unused.pt", qat_sha256="", calibration_yaml=data_yaml,
        calibration_fingerprint="", dataset_yaml=data_yaml, out_dir=tmp_path, settings=settings,
    )


def evaluator(data_yaml: Path, tmp_path: Path):
    return lambda model: evaluate_model(model, data_yaml, imgsz=IMGSZ, batch=8, device="cpu", workers=0, work_dir=tmp_path / "eval")


def test_known_answer_reestimating_a_converged_float_model_leaves_its_map_where_it_is(converged_float_model, tmp_path):
    model, data_yaml = converged_float_model
    evaluate = evaluator(data_yaml, tmp_path)
    before = evaluate(model)
    assert before["map50_95"] > 0.3  # a model that has learned the task, so its mAP can move
    result = run_bn_reestimation(model, before, reestimation_request(data_yaml, tmp_path), "cpu", evaluate, lambda m: None)
    assert result["batches"] == 200  # 16 images: the training pipeline is cycled, each pass with fresh augmentations
    assert abs(result["delta"]) < KNOWN_ANSWER_TOLERANCE


def test_reestimation_wins_back_what_corrupted_running_variances_cost(converged_float_model, tmp_path):
    model, data_yaml = converged_float_model
    evaluate = evaluator(data_yaml, tmp_path)
    clean = evaluate(model)["map50_95"]
    corrupted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, bn in batch_norms(corrupted):
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.3, 3, generator=generator))
    damaged = evaluate(corrupted)
    cost = clean - damaged["map50_95"]
    assert cost > 0.1  # the corruption is visible in mAP
    result = run_bn_reestimation(corrupted, damaged, reestimation_request(data_yaml, tmp_path), "cpu", evaluate, lambda m: None)
    assert result["map50_95_after"] - damaged["map50_95"] >= 0.9 * cost
