
from qat_assets.core import layout
from qat_assets_tests.coco_tree import coco_document, write_coco_tree
from qat_assets_tests.dagster_harness import latest_metadata, run_assets, step_failure_messages


def test_coco_subset_without_coco_root_uses_the_embedded_synthetic_set(storage, instance):
    result = run_assets(instance, ["coco_subset", "calibration_subset"])
    assert result.success
    metadata = latest_metadata(instance, "coco_subset")
    assert metadata["source"] == "synthetic"
    assert metadata["train_images"] == 16 and metadata["val_images"] == 8
    assert (layout.subset_dir(storage) / "dataset.yaml").is_file()
    assert latest_metadata(instance, "calibration_subset")["images"] == 8
    assert "| class | instances |" in metadata["preview"]


def test_coco_subset_converts_a_real_coco_tree(storage, instance, tmp_path, monkeypatch):
    coco_root = write_coco_tree(tmp_path / "coco", train=coco_document("train", 20), val=coco_document("val", 10))
    monkeypatch.setenv("QAT_COCO_ROOT", str(coco_root))
    result = run_assets(instance, ["coco_subset"])
    assert result.success
    metadata = latest_metadata(instance, "coco_subset")
    assert metadata["source"] == f"coco:{coco_root}"
    assert metadata["class_names"] == ["cat", "bird", "dog"]  # ascending category id, not JSON order
    assert len(metadata["fingerprint"]) == 64


def test_malformed_annotations_fail_the_step_with_one_message_naming_the_file(storage, instance, tmp_path, monkeypatch):
    coco_root = write_coco_tree(tmp_path / "coco")
    (coco_root / "annotations" / "instances_val2017.json").write_text("{not json")
    monkeypatch.setenv("QAT_COCO_ROOT", str(coco_root))
    result = run_assets(instance, ["coco_subset"])
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "instances_val2017.json" in message
    assert not layout.subset_dir(storage).exists()  # nothing half-written


def test_a_missing_coco_root_says_what_to_do(storage, instance, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_COCO_ROOT", str(tmp_path / "nowhere"))
    result = run_assets(instance, ["coco_subset"])
    (message,) = step_failure_messages(result)
    assert str(tmp_path / "nowhere") in message and "QAT_COCO_ROOT" in message
