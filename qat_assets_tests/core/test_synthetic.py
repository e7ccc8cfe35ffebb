"""The embedded synthetic set: a deterministic COCO tree that the real conversion turns into a subset."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from qat_assets.core.coco import convert_coco_subset
from qat_assets.core.synthetic import write_synthetic_coco


def tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_trees_and_a_new_seed_does_not(tmp_path):
    kwargs = dict(train_images=12, val_images=4, image_size=64)
    summary = write_synthetic_coco(tmp_path / "a", seed=0, **kwargs)
    write_synthetic_coco(tmp_path / "b", seed=0, **kwargs)
    write_synthetic_coco(tmp_path / "c", seed=1, **kwargs)

    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")
    assert summary["train"]["images"] == 12 and summary["val"]["images"] == 4


def test_tree_has_coco_layout_with_gapped_unordered_categories_and_boxes_inside_images(tmp_path):
    root = tmp_path / "coco"
    write_synthetic_coco(root, train_images=20, val_images=4, image_size=64, seed=3)
    train = json.loads((root / "annotations" / "instances_train2017.json").read_text())

    ids = [c["id"] for c in train["categories"]]
    assert ids != sorted(ids) and ids != list(range(1, len(ids) + 1))
    assert len(train["images"]) == 20 and len(list((root / "train2017").iterdir())) == 20
    per_image = {image["id"]: 0 for image in train["images"]}
    for annotation in train["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 9 and h >= 9
        assert annotation["iscrowd"] == 0
        per_image[annotation["image_id"]] += 1
    assert max(per_image.values()) <= 5
    assert sum(count == 0 for count in per_image.values()) == 2  # images 10 and 20 are background
    with Image.open(root / "train2017" / train["images"][0]["file_name"]) as image:
        assert image.size == (64, 64)


def test_conversion_gives_classes_in_category_id_order(tmp_path):
    write_synthetic_coco(tmp_path / "coco", train_images=16, val_images=8, image_size=64, seed=0)
    result = convert_coco_subset(tmp_path / "coco", tmp_path / "subset", train_images=16, val_images=8, seed=0,
                                 skip_bad_items=False, source="synthetic")

    assert result.class_names == ["rectangle", "ellipse", "triangle"]  # ids 1, 3, 7
    assert result.source == "synthetic"
    assert result.skipped == {}
    assert result.counts["train"]["images"] == 16 and result.counts["train"]["background_images"] == 1
    assert all(count > 0 for count in result.instances_per_class.values())


def test_existing_tree_is_replaced_whole(tmp_path):
    write_synthetic_coco(tmp_path / "coco", train_images=8, val_images=2, image_size=48, seed=0)
    write_synthetic_coco(tmp_path / "coco", train_images=3, val_images=2, image_size=48, seed=0)

    assert len(list((tmp_path / "coco" / "train2017").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        write_synthetic_coco(tmp_path / "coco", train_images=0, val_images=2, image_size=64, seed=0)
    with pytest.raises(ValueError, match="at least 32 px"):
        write_synthetic_coco(tmp_path / "coco", train_images=2, val_images=2, image_size=16, seed=0)
    assert not (tmp_path / "coco").exists()


def test_the_easy_set_is_unchanged_by_the_hard_variant():
    """The embedded default's boxes and classes (its random stream) are what they were before the hard variant:
    a sha256 of the annotations written by the code before it (JPEG bytes depend on the Pillow build)."""
    import hashlib
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_coco(Path(tmp) / "coco", train_images=12, val_images=4, image_size=64, seed=0)
        annotations = sorted((Path(tmp) / "coco" / "annotations").glob("*.json"))
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in annotations)).hexdigest()
    assert digest == "e8699caff8f2bc634eaa9defd538d944db99d562cfedf7b39787a815fb831808"


def test_the_hard_set_has_24_shape_and_hue_classes_small_crowded_objects_and_converts(tmp_path):
    summary = write_synthetic_coco(tmp_path / "coco", train_images=30, val_images=10, image_size=64, seed=0,
                                   difficulty="hard")
    assert summary["difficulty"] == "hard" and len(summary["categories"]) == 24
    coco = json.loads((tmp_path / "coco" / "annotations" / "instances_train2017.json").read_text())
    ids = [c["id"] for c in coco["categories"]]
    assert ids != sorted(ids) and all(i % 2 == 0 for i in ids)  # gapped and out of order, as in COCO
    sides = [max(a["bbox"][2], a["bbox"][3]) / 64 for a in coco["annotations"]]
    assert max(sides) <= 0.3 + 1 / 64 and min(sides) >= 0.1 - 1 / 64
    per_image = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert max(per_image.values()) > 5  # crowded: the easy set has at most 5
    subset = convert_coco_subset(tmp_path / "coco", tmp_path / "subset", train_images=30, val_images=10, seed=0,
                                 skip_bad_items=False, source="synthetic")
    assert len(subset.class_names) == 24 and "red rectangle" in subset.class_names


def test_an_unknown_difficulty_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'medium' is not one of easy, hard"):
        write_synthetic_coco(tmp_path / "coco", train_images=2, val_images=2, image_size=64, seed=0, difficulty="medium")
