from qat_assets.core.comparison import build_comparison
from qat_assets.core.gate import decide_gate
from qat_assets.core.plots import plot_map_curves, render_summary_md
from qat_assets_tests.core.test_summary import make_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def runs_of(variant):
    return [
        make_summary(variant=variant, method="baseline", seed=0, maps=(0.20, 0.30, 0.12), qc_after=0.15),
        make_summary(variant=variant, method="baseline", seed=1, maps=(0.20, 0.28, 0.25), qc_after=None),
        make_summary(variant=variant, method="ema", seed=0, maps=(0.20, 0.30, 0.31), qc_after=0.33),
        make_summary(variant=variant, method="ema", seed=1, maps=(0.20, 0.29, float("nan")), planned_epochs=2),
    ]


def test_plot_is_a_real_png_written_atomically(tmp_path):
    out = plot_map_curves(runs_of("yolo10n"), tmp_path / "plots" / "yolo10n.png", "yolo10n W4A16",
                          fp_map50_95=0.385)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["yolo10n.png"]


def test_plot_with_more_runs_draws_more(tmp_path):
    sparse = plot_map_curves([], tmp_path / "empty.png", "no runs").stat().st_size
    full = plot_map_curves(runs_of("yolo10n"), tmp_path / "full.png", "runs", fp_map50_95=0.385).stat().st_size
    assert sparse > 5_000 and full > sparse


def test_summary_md_holds_gate_tables_and_relative_plot_links(tmp_path):
    runs = runs_of("yolo10n") + runs_of("yolo10s")
    report = tmp_path / "report"
    plots = {v: plot_map_curves([r for r in runs if r.variant == v], report / "plots" / f"{v}.png", v)
             for v in ("yolo10n", "yolo10s")}
    comparison = build_comparison(runs, {"yolo10n": {"map50_95": 0.385, "map50": 0.6}})
    gate = decide_gate(runs, seeds=[0, 1])
    markdown = render_summary_md(comparison, gate, plots, relative_to=report, summaries=runs)
    assert markdown.split("\n## Evidence\n\n- **")[1].startswith("yolo10n: ")  # the verdict heads the report
    assert "## QC budget and movement" in markdown
    assert not gate.passed
    assert f"**{gate.headline()}**" in markdown
    assert "- yolo10n/stability_verdict ema|1 (ema+QC) is incomplete: QAT run incomplete" in markdown
    assert "![mAP50-95 per epoch, yolo10s](plots/yolo10s.png)" in markdown
    assert "| baseline+QC | 1 | incomplete |" in markdown  # QC missing for baseline|1
    assert "FP reference: mAP50-95 0.3850, mAP50 0.6000." in markdown


def test_reporting_modules_stay_light_to_import():
    # The Dagster code location imports these; torch, dagster and matplotlib must not come along.
    import subprocess
    import sys

    code = (
        "import sys, qat_assets.core.plots, qat_assets.core.gate, qat_assets.core.stability;"
        "print(sorted(m for m in ('torch', 'dagster', 'matplotlib', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_sparsely_validated_run_is_drawn_through_its_validated_epochs(tmp_path):
    from qat_assets.core.plots import validated_epochs

    dense = make_summary(maps=(0.20, 0.28, 0.30, 0.31, 0.32, 0.31))
    unvalidated = {"map50_95": None, "map50": None, "precision": None, "recall": None}
    sparse = dense.model_copy(update={"history": [
        r.model_copy(update=unvalidated) if r.epoch in (1, 3) else r for r in dense.history]})
    assert [(r.epoch, r.map50_95) for r in validated_epochs(sparse)] == [(0, 0.20), (2, 0.30), (4, 0.32), (5, 0.31)]
    out = plot_map_curves([sparse, make_summary(method="baseline")], tmp_path / "sparse.png", "sparse", fp_map50_95=0.4)
    assert out.read_bytes().startswith(PNG_SIGNATURE)
