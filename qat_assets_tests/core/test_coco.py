"""COCO -> YOLO subset conversion: every rule and every bad input, on tiny hand-written COCO trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from qat_assets.core.coco import DatasetError, SubsetResult, convert_coco_subset
from qat_assets_tests.coco_tree import coco_document, write_coco_tree


def convert(root: Path, out: Path, **overrides) -> SubsetResult:
    settings = dict(train_images=100, val_images=100, seed=0, skip_bad_items=False) | overrides
    return convert_coco_subset(root, out, **settings)


def label(result: SubsetResult, split: str, image_id: int) -> str:
    return (result.root / "labels" / split / f"{image_id:012d}.txt").read_text()


def test_categories_map_to_ascending_id_order_and_keep_names(tmp_path):
    result = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "out")

    # JSON lists dog=9, cat=2, bird=5: indices follow the ids, not the listing order.
    assert result.class_names == ["cat", "bird", "dog"]
    assert label(result, "train", 100) == "2 0.350000 0.400000 0.500000 0.400000\n"  # dog
    assert label(result, "train", 101) == "0 0.350000 0.400000 0.500000 0.400000\n"  # cat
    assert label(result, "train", 102) == "1 0.350000 0.400000 0.500000 0.400000\n"  # bird
    dataset = yaml.safe_load(result.dataset_yaml.read_text())
    assert dataset == {"path": str(tmp_path / "out"), "train": "images/train", "val": "images/val",
                       "names": {0: "cat", 1: "bird", 2: "dog"}}
    assert result.instances_per_class == {"cat": 2, "bird": 2, "dog": 2}
    assert result.counts == {s: {"images": 4, "background_images": 1, "instances": 3} for s in ("train", "val")}
    assert result.source == f"coco:{tmp_path / 'coco'}"


def test_crowd_boxes_are_skipped_and_counted(tmp_path):
    train = coco_document("train")
    train["annotations"][0]["iscrowd"] = 1
    result = convert(write_coco_tree(tmp_path / "coco", train=train), tmp_path / "out")

    assert label(result, "train", 100) == ""
    assert result.skipped == {"crowd": 1}
    assert result.counts["train"]["background_images"] == 2


def test_boxes_are_clipped_to_the_image_then_dropped_below_one_pixel(tmp_path):
    train = coco_document("train")
    first = train["annotations"][0]
    train["annotations"] += [
        {**first, "id": 1, "bbox": [-5.0, -6.0, 20.0, 16.0]},  # clipped to x 0..15, y 0..10
        {**first, "id": 2, "bbox": [30.0, 25.0, 40.0, 40.0]},  # clipped to x 30..40, y 25..30
        {**first, "id": 3, "bbox": [10.0, 10.0, 0.5, 10.0]},  # 0.5 px wide
        {**first, "id": 4, "bbox": [39.5, 5.0, 10.0, 10.0]},  # 0.5 px wide once clipped
        {**first, "id": 5, "bbox": [50.0, 5.0, 10.0, 10.0]},  # entirely outside
    ]
    result = convert(write_coco_tree(tmp_path / "coco", train=train), tmp_path / "out")

    assert label(result, "train", 100).splitlines() == [
        "2 0.350000 0.400000 0.500000 0.400000",
        "2 0.187500 0.166667 0.375000 0.333333",
        "2 0.875000 0.916667 0.250000 0.166667",
    ]
    assert result.skipped == {"tiny_box": 3}


def test_images_without_boxes_are_kept_as_background(tmp_path):
    result = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "out")

    assert label(result, "train", 103) == ""
    assert (result.root / "images" / "train" / "000000000103.png").is_file()
    assert result.counts["train"]["background_images"] == 1


def test_images_are_hardlinked_and_layout_matches_ultralytics(tmp_path):
    result = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "out")

    assert result.link_mode == "hardlink"
    for split, first in (("train", 100), ("val", 900)):
        image = result.root / "images" / split / f"{first:012d}.png"
        assert os.stat(image).st_ino == os.stat(tmp_path / "coco" / f"{split}2017" / image.name).st_ino
        assert sorted(p.stem for p in (result.root / "images" / split).iterdir()) == sorted(
            p.stem for p in (result.root / "labels" / split).iterdir())
    assert SubsetResult.read(result.root) == result


def test_link_falls_back_to_symlink_then_copy(tmp_path, monkeypatch):
    root = write_coco_tree(tmp_path / "coco")

    def refuse(*args, **kwargs):
        raise OSError("not supported here")

    monkeypatch.setattr(os, "link", refuse)
    symlinked = convert(root, tmp_path / "sym")
    assert symlinked.link_mode == "symlink"
    assert (symlinked.root / "images" / "train" / "000000000100.png").is_symlink()

    monkeypatch.setattr(os, "symlink", refuse)
    copied = convert(root, tmp_path / "copy")
    assert copied.link_mode == "copy"
    image = copied.root / "images" / "train" / "000000000100.png"
    assert not image.is_symlink() and image.read_bytes() == (root / "train2017" / image.name).read_bytes()
    assert copied.fingerprint == symlinked.fingerprint


def test_ultralytics_reads_the_subset(tmp_path):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    result = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "out")
    data = check_det_dataset(str(result.dataset_yaml))
    dataset = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False, task="detect")

    assert data["names"] == {0: "cat", 1: "bird", 2: "dog"}
    assert len(dataset) == 4
    assert sorted(int(c) for item in dataset.labels for c in item["cls"].ravel()) == [0, 1, 2]


def test_annotation_with_unknown_image_id_fails_or_is_skipped(tmp_path):
    train = coco_document("train")
    train["annotations"].append({**train["annotations"][0], "id": 77, "image_id": 999})
    root = write_coco_tree(tmp_path / "coco", train=train)

    with pytest.raises(DatasetError, match=r"instances_train2017\.json.*image id 999.*QAT_SKIP_BAD_ITEMS"):
        convert(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert(root, tmp_path / "out", skip_bad_items=True)
    assert result.skipped == {"unknown_image_id": 1}
    assert result.counts["train"]["instances"] == 3


@pytest.mark.parametrize("damage, reason", [
    (lambda image: image.unlink(), "missing_image"),
    (lambda image: image.write_bytes(b"not an image at all"), "unreadable_image"),
])
def test_missing_or_unreadable_image_fails_or_is_skipped(tmp_path, damage, reason):
    root = write_coco_tree(tmp_path / "coco")
    broken = root / "train2017" / "000000000101.png"
    damage(broken)

    with pytest.raises(DatasetError, match=str(broken)):
        convert(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert(root, tmp_path / "out", skip_bad_items=True)
    assert result.skipped == {reason: 1}
    assert result.counts["train"] == {"images": 3, "background_images": 1, "instances": 2}
    assert not (result.root / "labels" / "train" / "000000000101.txt").exists()
    assert not (result.root / "images" / "train" / broken.name).exists()


def test_image_whose_size_differs_from_the_json_fails(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    train = coco_document("train")
    train["images"][0]["width"] = 41
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))

    with pytest.raises(DatasetError, match="is 40x30 but .* says 41x30"):
        convert(root, tmp_path / "out")
    assert convert(root, tmp_path / "out", skip_bad_items=True).skipped == {"image_size_mismatch": 1}


def test_malformed_annotation_entry_fails_or_is_skipped(tmp_path):
    train = coco_document("train")
    train["annotations"][1]["bbox"] = [1.0, 2.0, "wide"]
    root = write_coco_tree(tmp_path / "coco", train=train)

    with pytest.raises(DatasetError, match="bbox"):
        convert(root, tmp_path / "out")
    assert convert(root, tmp_path / "out", skip_bad_items=True).skipped == {"malformed_annotation": 1}


def test_malformed_json_fails_even_when_skipping(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    bad = root / "annotations" / "instances_val2017.json"
    bad.write_text('{"images": [')

    for skip in (False, True):
        with pytest.raises(DatasetError, match=rf"{bad} is not valid JSON.*re-extract"):
            convert(root, tmp_path / "out", skip_bad_items=skip)
    assert not (tmp_path / "out").exists()


def test_missing_annotation_file_or_root_fails_naming_it(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    (root / "annotations" / "instances_train2017.json").unlink()

    with pytest.raises(DatasetError, match=r"instances_train2017\.json is missing.*QAT_COCO_ROOT"):
        convert(root, tmp_path / "out")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'nowhere'} does not exist.*QAT_COCO_ROOT"):
        convert(tmp_path / "nowhere", tmp_path / "out")


def test_splits_with_different_categories_fail(tmp_path):
    val = coco_document("val")
    val["categories"][0]["name"] = "wolf"

    with pytest.raises(DatasetError, match="same categories"):
        convert(write_coco_tree(tmp_path / "coco", val=val), tmp_path / "out")


def test_empty_subset_is_an_error(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    for image in (root / "val2017").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="no usable images selected for the val split"):
        convert(root, tmp_path / "out", skip_bad_items=True)

    no_images = coco_document("val", images=0)
    with pytest.raises(DatasetError, match="empty subset"):
        convert(write_coco_tree(tmp_path / "coco2", val=no_images), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_selection_is_seeded_and_reproducible(tmp_path):
    root = write_coco_tree(tmp_path / "coco", train=coco_document("train", images=12))
    logged: list[str] = []

    first = convert(root, tmp_path / "a", train_images=5, val_images=2, seed=0, log=logged.append)
    again = convert(root, tmp_path / "b", train_images=5, val_images=2, seed=0)
    reseeded = convert(root, tmp_path / "c", train_images=5, val_images=2, seed=1)
    bigger = convert(root, tmp_path / "d", train_images=6, val_images=2, seed=0)

    def files(result: SubsetResult) -> dict[str, bytes]:
        return {str(p.relative_to(result.root)): p.read_bytes() for p in sorted((result.root / "labels").rglob("*"))
                if p.is_file()}

    assert first.counts["train"]["images"] == 5 and first.counts["val"]["images"] == 2
    assert first.fingerprint == again.fingerprint and files(first) == files(again)
    assert files(first) != files(reseeded) and first.fingerprint != reseeded.fingerprint
    assert first.fingerprint != bigger.fingerprint
    assert any("train: 5 images" in line for line in logged)


def test_asking_for_more_images_than_listed_uses_all_and_says_so(tmp_path):
    logged: list[str] = []
    result = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "out", train_images=50, log=logged.append)

    assert result.counts["train"]["images"] == 4
    assert any("fewer than the 50 asked for" in line for line in logged)


def test_fingerprint_follows_annotation_content(tmp_path):
    before = convert(write_coco_tree(tmp_path / "coco"), tmp_path / "a")
    train = coco_document("train")
    train["annotations"][0]["bbox"] = [4.0, 6.0, 20.0, 13.0]
    after = convert(write_coco_tree(tmp_path / "coco", train=train), tmp_path / "b")

    assert before.fingerprint != after.fingerprint


def test_existing_subset_is_replaced_only_on_success(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    out = tmp_path / "out"
    kept = convert(root, out, train_images=2)
    (root / "annotations" / "instances_val2017.json").write_text("{broken")

    with pytest.raises(DatasetError):
        convert(root, out)
    assert SubsetResult.read(out) == kept and kept.counts["train"]["images"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out"]  # no staging leftovers

    write_coco_tree(root)
    replaced = convert(root, out)
    assert replaced.counts["train"]["images"] == 4
    assert len(list((out / "labels" / "train").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out"]


def test_preview_markdown_shows_counts_and_skips(tmp_path):
    train = coco_document("train")
    train["annotations"][0]["iscrowd"] = 1
    preview = convert(write_coco_tree(tmp_path / "coco", train=train), tmp_path / "out").preview_markdown()

    assert "| train | 4 | 2 | 2 |" in preview
    assert "| dog | 1 |" in preview  # the crowd box was a dog
    assert "crowd: 1" in preview
