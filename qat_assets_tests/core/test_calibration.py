"""The QC calibration set D_c: a seeded, self-contained sample of the subset's training images."""

from __future__ import annotations

import pytest
import yaml

from qat_assets.core.calibration import select_calibration_subset
from qat_assets.core.coco import DatasetError, SubsetResult, convert_coco_subset
from qat_assets_tests.coco_tree import coco_document, write_coco_tree


@pytest.fixture
def subset(tmp_path) -> SubsetResult:
    root = write_coco_tree(tmp_path / "coco", train=coco_document("train", images=10))
    return convert_coco_subset(root, tmp_path / "subset", train_images=10, val_images=4, seed=0,
                               skip_bad_items=False)


def test_calibration_set_is_a_seeded_sample_of_train_with_its_own_labels(subset, tmp_path):
    result = select_calibration_subset(subset, tmp_path / "calib", size=4, seed=0)

    listed = result.image_list.read_text().splitlines()
    assert result.images == 4 and len(listed) == 4 == len(set(listed))
    train_names = {p.name for p in (subset.root / "images" / "train").iterdir()}
    for line in listed:
        image = result.root / "images" / "calibration" / line.rsplit("/", 1)[1]
        assert line == str(image) and image.is_file() and image.name in train_names
        label = result.root / "labels" / "calibration" / f"{image.stem}.txt"
        assert label.read_bytes() == (subset.root / "labels" / "train" / label.name).read_bytes()
    dataset = yaml.safe_load(result.dataset_yaml.read_text())
    assert dataset == {"path": str(tmp_path / "calib"), "train": "images.txt", "val": "images.txt",
                       "names": {0: "cat", 1: "bird", 2: "dog"}}


def test_fingerprint_is_stable_and_follows_seed_size_and_subset(subset, tmp_path):
    first = select_calibration_subset(subset, tmp_path / "a", size=4, seed=0)
    again = select_calibration_subset(subset, tmp_path / "b", size=4, seed=0)
    reseeded = select_calibration_subset(subset, tmp_path / "c", size=4, seed=1)
    bigger = select_calibration_subset(subset, tmp_path / "d", size=5, seed=0)
    other_subset = select_calibration_subset(subset.model_copy(update={"fingerprint": "0" * 64}), tmp_path / "e",
                                             size=4, seed=0)

    assert first.fingerprint == again.fingerprint and names(first) == names(again)
    assert names(first) != names(reseeded) and first.fingerprint != reseeded.fingerprint
    assert len({first.fingerprint, bigger.fingerprint, other_subset.fingerprint}) == 3


def names(result) -> list[str]:
    return [line.rsplit("/", 1)[1] for line in result.image_list.read_text().splitlines()]


@pytest.mark.parametrize("size", [0, 11])
def test_impossible_sizes_fail_naming_the_numbers(subset, tmp_path, size):
    with pytest.raises(DatasetError, match=rf"calibration size {size} .* has 10 images.*between 1 and 10"):
        select_calibration_subset(subset, tmp_path / "calib", size=size, seed=0)
    assert not (tmp_path / "calib").exists()


def test_ultralytics_reads_the_calibration_set(subset, tmp_path):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    result = select_calibration_subset(subset, tmp_path / "calib", size=6, seed=0)
    data = check_det_dataset(str(result.dataset_yaml))
    dataset = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False, task="detect")

    assert data["train"] == data["val"] == str(result.image_list)
    assert sorted(dataset.im_files) == sorted(result.image_list.read_text().splitlines())
    assert all(str(result.root) in f for f in dataset.label_files)
