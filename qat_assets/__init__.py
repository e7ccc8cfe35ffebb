"""qat_assets: does EMA + Quantization Correction keep W4A16 QAT of YOLOv10 from collapsing?

`defs` (the code location) is loaded on first access, so importing the ML library `qat_assets.core`
or the worker does not import Dagster, and `dagster ... -m qat_assets` still finds it.
"""


def __getattr__(name: str):
    if name == "defs":
        from qat_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'qat_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return ["defs"]
