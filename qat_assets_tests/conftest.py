"""Test-wide environment: no network, small thread counts, artifacts in temp folders."""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("QAT_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
