"""Starting from a user's Ultralytics checkpoint: variant, class count and damage checks."""

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.models import CheckpointError, read_user_checkpoint, variant_yaml

NAMES = ["rectangle", "ellipse", "triangle"]


def ultralytics_checkpoint(path, yaml, nc):
    """What Ultralytics writes: a dict holding the pickled model module; returns the path and its weights."""
    model = DetectionModel(yaml, nc=nc, verbose=False).half()
    torch.save({"model": model, "train_args": {}}, path)
    return path, model.float().state_dict()


def test_variant_names_map_to_the_packaged_yaml():
    assert variant_yaml("yolo10s") == "yolov10s.yaml"
    with pytest.raises(ValueError, match="unknown variant"):
        variant_yaml("yolov8n")


def test_matching_checkpoint_keeps_its_weights(tmp_path):
    path, original = ultralytics_checkpoint(tmp_path / "yolov10n.pt", "yolov10n.yaml", 3)
    model, note = read_user_checkpoint(path, "yolo10n", NAMES, "reinit_head")
    assert note["head"] == "kept"
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_80_class_weights_on_a_3_class_set_reinitialise_the_head_or_fail(tmp_path):
    path, original = ultralytics_checkpoint(tmp_path / "yolov10n.pt", "yolov10n.yaml", 80)
    model, note = read_user_checkpoint(path, "yolo10n", NAMES, "reinit_head")
    assert note == {"head": "re-initialised", "checkpoint_classes": 80, "dataset_classes": 3}
    assert model.model[-1].nc == 3
    assert torch.equal(model.state_dict()["model.0.conv.weight"], original["model.0.conv.weight"])
    with pytest.raises(CheckpointError, match="predicts 80 classes but the dataset has 3"):
        read_user_checkpoint(path, "yolo10n", NAMES, "fail")


def test_the_wrong_variant_or_family_is_named(tmp_path):
    small, _ = ultralytics_checkpoint(tmp_path / "yolov10n.pt", "yolov10s.yaml", 3)
    with pytest.raises(CheckpointError, match="not a YOLOv10 yolo10n"):
        read_user_checkpoint(small, "yolo10n", NAMES, "reinit_head")
    v8, _ = ultralytics_checkpoint(tmp_path / "v8.pt", "yolov8n.yaml", 3)
    with pytest.raises(CheckpointError, match="not a YOLOv10"):
        read_user_checkpoint(v8, "yolo10n", NAMES, "reinit_head")


def test_a_truncated_checkpoint_is_named_with_what_to_do(tmp_path):
    path, _ = ultralytics_checkpoint(tmp_path / "yolov10n.pt", "yolov10n.yaml", 3)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="yolov10n.pt is not a readable Ultralytics checkpoint"):
        read_user_checkpoint(path, "yolo10n", NAMES, "reinit_head")


def checkpoint_of(path, model, version):
    """An Ultralytics-format checkpoint of `model` as a given Ultralytics version wrote it."""
    torch.save({"model": model.half(), "train_args": {}, "version": version}, path)
    return path


def test_a_checkpoint_lacking_a_key_names_it_and_the_version_that_wrote_it(tmp_path):
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    model.model[0].bn.register_buffer("num_batches_tracked", None)  # as a BN of an older PyTorch/Ultralytics
    path = checkpoint_of(tmp_path / "yolov10n.pt", model, "8.1.34")
    for on_class_mismatch in ("reinit_head", "fail"):
        with pytest.raises(CheckpointError) as error:
            read_user_checkpoint(path, "yolo10n", NAMES, on_class_mismatch)
        message = str(error.value)
        assert "written by Ultralytics 8.1.34" in message
        assert "1 missing keys: model.0.bn.num_batches_tracked; 0 unexpected keys: none" in message


def test_a_checkpoint_with_an_extra_key_names_it_also_when_the_head_is_reinitialised(tmp_path):
    # With another class count the head is re-initialised through Ultralytics' partial load, which would
    # silently skip a key it does not know.
    model = DetectionModel("yolov10n.yaml", nc=80, verbose=False)
    model.model[2].register_buffer("legacy_anchors", torch.zeros(3))
    path = checkpoint_of(tmp_path / "yolov10n.pt", model, "8.2.0")
    with pytest.raises(CheckpointError, match=r"written by Ultralytics 8\.2\.0.*0 missing keys: none; "
                       r"1 unexpected keys: model\.2\.legacy_anchors"):
        read_user_checkpoint(path, "yolo10n", NAMES, "reinit_head")
