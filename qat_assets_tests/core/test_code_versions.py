"""Code versions follow every package module a heavy step imports, however it is imported."""

import shutil
import textwrap

import pytest

from qat_assets.core.code_versions import PACKAGE_DIR, modules_used_by, source_code_version
from qat_assets.defs.variant.assets import CODE_VERSIONS, STEP_MODULES


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the package's sources, to change one module at a time without touching the real ones."""
    copy = tmp_path_factory.mktemp("src") / "qat_assets"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return copy


def test_every_import_form_is_followed(tmp_path):
    package = tmp_path / "qat_assets"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/step.py": """
            from . import sibling
            from .relative import thing
            from qat_assets.core import absolute_sub
            import qat_assets.core.plain_import as alias
            from ..other import helper

            def lazy():
                from qat_assets.core.lazy import late
        """,
        "core/sibling.py": "from .chained import x\n",
        "core/chained.py": "", "core/relative.py": "", "core/absolute_sub.py": "", "core/plain_import.py": "",
        "core/lazy.py": "", "core/unused.py": "", "other.py": "import json\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text))
    used = modules_used_by("qat_assets.core.step", package)
    assert used == sorted(
        f"qat_assets.{m}" for m in ("core.step", "core.sibling", "core.chained", "core.relative", "core.absolute_sub",
                                    "core.plain_import", "core.lazy", "other")
    )


def test_the_exporter_is_part_of_onnx_models_code_version():
    assert "qat_assets.core.onnx_export" in modules_used_by("qat_assets.core.export_stage")  # `from . import onnx_export`


@pytest.mark.parametrize("stage", sorted(STEP_MODULES))
def test_a_change_to_any_module_a_step_imports_changes_its_code_version(stage, package_copy):
    module = STEP_MODULES[stage]
    assert CODE_VERSIONS[stage] == source_code_version(module)  # what the asset carries
    before = source_code_version(module, package_copy)
    assert before == CODE_VERSIONS[stage]  # the copy is the same source
    used = modules_used_by(f"qat_assets.core.{module}", package_copy)
    for name in used:
        path = package_copy.joinpath(*name.split(".")[1:]).with_suffix(".py")
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        try:
            assert source_code_version(module, package_copy) != before, f"{name} changed, {stage}'s code version did not"
        finally:
            path.write_bytes(original)
    unused = package_copy / "core" / "plots.py"  # no step imports the plots
    assert "qat_assets.core.plots" not in used
    unused.write_bytes(unused.read_bytes() + b"\n# changed\n")
    assert source_code_version(module, package_copy) == before
