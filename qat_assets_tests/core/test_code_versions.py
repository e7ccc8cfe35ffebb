"""Code versions follow every core module a heavy step uses, however it is imported."""

from qat_assets.core.code_versions import core_modules_used_by


def test_qat_code_version_covers_modules_imported_relatively_and_absolutely():
    used = core_modules_used_by("qat")
    assert {"qat", "trainer", "quantize", "oscillation"} <= set(used)  # `from .x import`
    assert "flat_weight_quant" in used  # only `from qat_assets.core.flat_weight_quant import` reaches it
