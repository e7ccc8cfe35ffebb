"""qat_assets: does EMA + Quantization Correction keep W4A16 QAT of YOLOv10 from collapsing?"""

from qat_assets.definitions import defs

__all__ = ["defs"]
