"""The collapse diagnostics as summary.md and the Dagster UI show them, from recorded histories."""

from qat_assets.core.diagnostics_report import diagnostics_markdown, last_diagnostics, model_rows
from qat_assets.core.summary import EpochDiagnostics, LayerDiagnostics
from qat_assets_tests.core.test_summary import make_summary


def diagnostics(zero_fraction: float, mismatch: float) -> EpochDiagnostics:
    layer = LayerDiagnostics(name="model.2.cv1.conv", bit_width=4, weights=100, out_channels=4,
                             zero_code_fraction=zero_fraction, dead_channels=1, max_over_rms=5.0, scale=0.1)
    return EpochDiagnostics(
        model={"zero_code_fraction": zero_fraction, "worst_zero_code_fraction": zero_fraction,
               "worst_zero_code_layer": layer.name, "dead_channels": 1, "out_channels": 4, "max_over_rms": 5.0,
               "worst_max_over_rms": 5.0, "bn_log_var_mismatch": mismatch, "worst_bn_log_var_mismatch": mismatch,
               "worst_bn_layer": "model.2.cv1.bn", "oscillating_fraction": 0.01, "oscillation_frequency": 0.002},
        layers=[layer], bn=[],
    )


def with_diagnostics(summary, per_epoch):
    for record, value in zip(summary.history[1:], per_epoch):
        record.diagnostics = value
    return summary


def test_the_section_shows_the_live_weights_at_their_peak_and_at_the_end():
    baseline = with_diagnostics(make_summary(method="baseline", maps=(0.2, 0.30, 0.10)),
                                [diagnostics(0.10, 0.05), diagnostics(0.40, 0.90)])
    ema = with_diagnostics(make_summary(method="ema", maps=(0.2, 0.25, 0.28)),
                           [diagnostics(0.10, 0.05), diagnostics(0.40, 0.90)])
    lines = diagnostics_markdown([ema, baseline])
    rows = [line for line in lines if line.startswith("| yolo10n")]
    # One trajectory per seed, read through the baseline (the live weights' mAP); peak epoch 1, end epoch 2.
    assert len(rows) == 2
    assert rows[0].startswith("| yolo10n | 0 | baseline | peak 1 | 0.3000 | 10.00 % (model.2.cv1.conv 10.00 %) | 1/4 |")
    assert rows[1].startswith("| yolo10n | 0 | baseline | end 2 | 0.1000 | 40.00 %")
    assert "| 0.900 (model.2.cv1.bn 0.900) |" in rows[1]


def test_runs_without_diagnostics_say_so_and_the_rows_skip_unmeasured_epochs():
    old = make_summary(method="baseline", maps=(0.2, 0.3))
    assert diagnostics_markdown([old])[-1].startswith("No run recorded diagnostics")
    history = [{"epoch": 0}, {"epoch": 1, "diagnostics": diagnostics(0.1, 0.2).model_dump()}, {"epoch": 2, "diagnostics": None}]
    assert [row["epoch"] for row in model_rows(history)] == [1]
    assert last_diagnostics(history)["layers"][0]["name"] == "model.2.cv1.conv"
