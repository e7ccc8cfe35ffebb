"""qat_assets: does EMA + Quantization Correction keep W4A16 QAT of YOLOv10 from collapsing?

The code location (`qat_assets.definitions.defs`) is loaded on first access of `code_location`, so
importing the ML library `qat_assets.core` or the worker does not import Dagster, and
`dagster ... -m qat_assets` still finds it. It is not called `defs` here because `qat_assets.defs` is
the package of the Dagster definitions, and importing it binds that name to the package.
"""


def __getattr__(name: str):
    if name == "code_location":
        from qat_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'qat_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return ["code_location"]
