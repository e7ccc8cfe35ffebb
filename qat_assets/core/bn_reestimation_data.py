"""The batches BN re-estimation measures on: the QAT run's own training pipeline.

A model's BN running statistics belong to the input distribution its weights were trained on, which is the
training transforms' (random scale, translation, HSV, flips), not the letterboxed val-mode images QC
calibrates on. Re-estimated on the FP yolov10s of an embedded ladder (FP mAP50-95 0.6093), the val-mode
loader cost -0.117; Ultralytics' training dataset and transforms -0.007 (docs: /work/shared/research.md,
"Known-answer checks that failed"). So re-estimation reads Ultralytics' training dataset in mode "train"
with the QAT run's hyperparameters, shuffled, as the reference code (oscillations-qat) reads its training
loader. After QAT it uses the transforms of the run's last epochs: Ultralytics closes mosaic for the final
`close_mosaic` epochs, so when that window covers the last epoch, re-estimation closes it too.

Its own loader rather than QC's calibration loader: the two corrections need different data (QC trains on
fixed calibration images with the task loss; re-estimation measures the training distribution).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from copy import copy
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .settings import Settings
from .trainer import preserved_random_state, trainer_overrides


def qat_training_hyperparameters(settings: Settings, variant: str, data_yaml: Path, device: str, seed: int):
    """The Ultralytics arguments (augmentation included) the QAT trainer of these settings trains with.

    Built from `trainer_overrides`, which QAT shares with FP pretraining; QAT adds only optimizer, LR, warmup
    and nominal-batch keys to it (core/qat.py), none of which touches the data pipeline.
    """
    from ultralytics.cfg import get_cfg

    overrides = trainer_overrides(settings, variant, data_yaml, Path("."), device, settings.qat_epochs, seed)
    return get_cfg(overrides=overrides)


def training_dataset(hyperparameters, data_yaml: Path, model: nn.Module, final_epochs: bool = True):
    """Ultralytics' training dataset of `data_yaml` in mode "train" (augmenting as `hyperparameters` say).

    `final_epochs`: the transforms of a finished run's last epoch, i.e. mosaic closed when `close_mosaic` > 0.
    """
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    hyp = copy(hyperparameters)
    data = check_det_dataset(str(data_yaml), autodownload=False)
    stride = max(int(model.stride.max()), 32)  # as DetectionTrainer.build_dataset
    dataset = build_yolo_dataset(hyp, data["train"], hyp.batch, data, mode="train", rect=False, stride=stride)
    if final_epochs and hyp.close_mosaic:
        dataset.close_mosaic(hyp=copy(hyp))  # what the trainer does on entering its last close_mosaic epochs
    return dataset


def shuffled_image_batches(dataset, batch: int, workers: int, device: str, seed: int) -> Iterator[torch.Tensor]:
    """Preprocessed images ([0, 1] floats on `device`) of shuffled batches, cycling through the dataset.

    Each pass draws fresh augmentations, so a small dataset can give the ~50 batches re-estimation asks
    for. The order and the augmentations in worker processes follow `seed`; with `workers=0` the
    augmentations draw from Python's global `random`, which `seeded_random_state` fixes and restores.
    """
    from ultralytics.data.build import seed_worker

    if len(dataset) == 0:
        raise ValueError("BN re-estimation's training dataset is empty; check the `train:` entry of the dataset YAML")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(batch, len(dataset)), shuffle=True, num_workers=workers,
        collate_fn=dataset.collate_fn, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
        pin_memory=str(device).startswith("cuda"),
    )
    for batch_dict in itertools.chain.from_iterable(map(iter, itertools.repeat(loader))):
        yield batch_dict["img"].to(device, non_blocking=True).float() / 255


@contextlib.contextmanager
def seeded_random_state(seed: int):
    """Python's, NumPy's and torch's global random state seeded for the block and restored afterwards.

    Re-estimation in the middle of a QAT run then draws nothing from the training's random streams.
    """
    with preserved_random_state():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
