import json
import os
import subprocess
import sys

from qat_assets.core import layout
from qat_assets.core.coco import SubsetResult
from qat_assets.defs.variant.partitions import partition_key
from qat_assets_tests.dagster_harness import latest_metadata, run_assets, step_failure_messages
from qat_assets_tests.stage_outputs import write_pretrained, write_qat_and_qc

HEALTHY = [0.30, 0.33, 0.36]
COLLAPSED = [0.30, 0.36, 0.37, 0.36, 0.10, 0.09]  # best 0.36 (median of epochs 1-3), final 0.10 (3-5)


def prepare_runs(storage, instance, ema_maps, qc_after, baseline_maps=COLLAPSED):
    """A real subset, then QAT/QC sidecars for every yolo10n/yolo10s partition and their real verdicts."""
    assert run_assets(instance, ["coco_subset"]).success
    fingerprint = SubsetResult.read(layout.subset_dir(storage)).fingerprint
    for variant in ("yolo10n", "yolo10s"):
        write_pretrained(storage, variant, fingerprint)
        for seed in (0, 1):
            write_qat_and_qc(storage, variant, "baseline", seed, baseline_maps, dataset_fingerprint=fingerprint, qc_after=0.2)
            write_qat_and_qc(storage, variant, "ema", seed, ema_maps, dataset_fingerprint=fingerprint, qc_after=qc_after)
    for method in ("baseline", "ema"):
        for seed in (0, 1):
            result = run_assets(instance, ["yolo10n/stability_verdict", "yolo10s/stability_verdict"], partition_key(method, seed))
            assert result.success, step_failure_messages(result)


def test_gate_on_a_fresh_instance_materializes_not_passed_naming_the_missing_partitions(storage, instance):
    result = run_assets(instance, ["gate"])
    assert not any("FileNotFoundError" in m for m in step_failure_messages(result))
    metadata = latest_metadata(instance, "gate")
    assert metadata["passed"] is False
    reasons = "\n".join(metadata["reasons"])
    for variant in ("yolo10n", "yolo10s"):
        for key in ("ema|0", "ema|1"):
            assert f"{variant}/stability_verdict {key} is missing" in reasons
    # the blocking check mirrors the decision; the evidence check warns that nothing was compared
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["gate_passed"].passed is False
    assert checks["evidence_informative"].passed is False


def test_gate_passes_end_to_end_when_ema_qc_is_stable_for_two_seeds_of_both_variants(storage, instance):
    prepare_runs(storage, instance, HEALTHY, qc_after=0.38)
    result = run_assets(instance, ["comparison", "gate"])
    assert result.success, step_failure_messages(result)
    assert latest_metadata(instance, "gate")["passed"] is True
    summary = (layout.comparison_dir(storage) / "summary.md").read_text()
    assert "ema+QC" in summary and "yolo10s_map50_95.png" in summary
    assert (layout.comparison_dir(storage) / "yolo10n_map50_95.png").stat().st_size > 5000
    comparison = latest_metadata(instance, "comparison")
    assert comparison["runs"] == 8 and "data:image/png;base64" in comparison["yolo10n_plot"]
    assert ("yolo10n: EMA+QC prevented a collapse the baseline showed: prevented in 2/2 seeds whose baseline "
            "collapsed (one-sided sign test p = 0.25)") in comparison["evidence"]
    assert summary.index("## Evidence") < summary.index("gate PASSED")
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["evidence_informative"].passed is True


def test_a_passing_gate_on_uninformative_evidence_warns_without_blocking(storage, instance):
    from dagster import AssetCheckSeverity

    prepare_runs(storage, instance, HEALTHY, qc_after=0.38, baseline_maps=HEALTHY)
    result = run_assets(instance, ["comparison", "gate"])
    assert result.success, step_failure_messages(result)  # a WARN check does not fail the run
    gate = latest_metadata(instance, "gate")
    assert gate["passed"] is True and gate["evidence_informative"] is False
    assert "uninformative: the baseline did not collapse (0/2 seeds)" in gate["evidence"]
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["gate_passed"].passed is True
    warning = checks["evidence_informative"]
    assert warning.passed is False and warning.severity == AssetCheckSeverity.WARN


def test_gate_fails_end_to_end_when_ema_qc_collapses_and_says_so(storage, instance):
    prepare_runs(storage, instance, COLLAPSED, qc_after=0.1)
    result = run_assets(instance, ["comparison", "gate"])
    metadata = latest_metadata(instance, "gate")
    assert metadata["passed"] is False
    assert any("collapsed" in reason for reason in metadata["reasons"])
    assert not result.success  # the blocking check fails the run


def test_gate_from_the_cli_on_a_fresh_instance_ends_with_not_passed_and_no_file_errors(storage, tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "qat_assets", "--select", "gate"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    output = completed.stdout + completed.stderr
    assert "FileNotFoundError" not in output
    assert "gate NOT PASSED" in output
    assert "yolo10n/stability_verdict ema|0 is missing" in output
    assert json.loads(layout.gate_file(storage).read_text())["passed"] is False


def test_yolo10m_refuses_to_run_behind_a_failing_gate_and_gives_the_reasons(storage, instance):
    run_assets(instance, ["gate"])
    result = run_assets(instance, ["yolo10m/pretrained_checkpoint"])
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "latest gate did not pass" in message and "yolo10n/stability_verdict ema|0 is missing" in message


def test_comparison_reads_the_onnx_results_of_exported_partitions(storage):
    from qat_assets.core.settings import load_settings
    from qat_assets.defs.decision.assets import collect_onnx_results

    settings = load_settings()
    path = layout.run_dir(storage, "yolo10n", "onnx_model", "ema", 0) / "onnx_model.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"variant": "yolo10n", "method": "ema", "seed": 0, "source": "qc"}))
    assert collect_onnx_results(settings) == [{"variant": "yolo10n", "method": "ema", "seed": 0, "source": "qc"}]
