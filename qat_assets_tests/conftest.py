"""Test-wide environment: no network, small thread counts, artifacts in temp folders."""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("QAT_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
from dagster import instance_for_test


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """Artifacts of this test in a temp folder; settings at the smoke profile."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("QAT_STORAGE", str(root))
    monkeypatch.setenv("QAT_PROFILE", "smoke")
    monkeypatch.delenv("QAT_COCO_ROOT", raising=False)
    monkeypatch.delenv("QAT_CHECKPOINT_DIR", raising=False)
    return root


@pytest.fixture
def instance():
    with instance_for_test() as temporary_instance:
        yield temporary_instance
