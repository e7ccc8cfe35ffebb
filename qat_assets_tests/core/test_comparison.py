import statistics

import pytest

from qat_assets.core.comparison import (
    Comparison,
    build_comparison,
    comparability_key,
    comparability_reference,
    find_non_comparable,
)
from qat_assets.core.evaluate import evaluation_settings
from qat_assets.core.settings import load_settings
from qat_assets.core.trainer import training_batch
from qat_assets.core.verdict import build_run_summary
from qat_assets_tests.core.test_summary import make_summary, within_seed


def group(**odd):
    """Three comparable runs plus one run that differs by `odd` (the newest, so ties cannot favour it)."""
    runs = [make_summary(method="ema", seed=s, created_minutes=s) for s in (0, 1)]
    runs.append(make_summary(method="baseline", seed=0, created_minutes=2))
    runs.append(make_summary(method="baseline", seed=1, created_minutes=3, **odd))
    return runs


@pytest.mark.parametrize(
    "odd, words",
    [
        ({"dataset_fp": "data-2"}, "dataset fingerprint data-2 != data-1"),
        ({"evaluation": {"imgsz": 96, "conf": 0.001, "iou": 0.7, "split": "val", "batch": 8}},
         "evaluation settings imgsz=96 != 64"),
        ({"profile_fp": "prof-2"}, "training profile prof-2 != prof-1"),
    ],
)
def test_each_part_of_the_key_breaks_comparability(odd, words):
    runs = group(**odd)
    assert len({comparability_key(r) for r in runs}) == 2
    problems = find_non_comparable(runs)
    assert list(problems) == [("yolo10n", "baseline|1")]
    assert words in problems[("yolo10n", "baseline|1")]


def test_equal_runs_are_comparable_and_ties_go_to_the_newest_run():
    assert find_non_comparable(group()) == {}
    old, new = make_summary(seed=0, dataset_fp="old"), make_summary(seed=1, dataset_fp="new", created_minutes=5)
    assert comparability_reference([old, new]).dataset_fingerprint == "new"
    assert list(find_non_comparable([new, old])) == [("yolo10n", "ema|0")]


def test_a_run_on_other_data_than_the_fp_reference_is_not_comparable():
    runs = group()
    problems = find_non_comparable(runs, fp_dataset_fingerprints={"yolo10n": "data-9"})
    assert len(problems) == 4 and "FP reference's data-9" in problems[("yolo10n", "ema|0")]
    assert find_non_comparable(runs, fp_dataset_fingerprints={"yolo10s": "data-9"}) == {}


def test_comparison_rows_means_and_exclusion_of_non_comparable_runs():
    runs = [
        make_summary(method="ema", seed=0, maps=(0.2, 0.30, 0.30, 0.30), qc_after=0.31),
        make_summary(method="ema", seed=1, maps=(0.2, 0.30, 0.26, 0.26), qc_after=0.27),
        make_summary(method="ema", seed=2, maps=(0.2, 0.30, 0.31, 0.30, 0.10, 0.10), qc_after=0.12),  # collapsed
        make_summary(method="ema", seed=3, maps=(0.2, 0.30, 0.29), profile_fp="other"),  # not comparable
        make_summary(method="ema", seed=4, maps=(0.2, 0.30), planned_epochs=2),  # incomplete
        make_summary(method="baseline", seed=0, maps=(0.2, 0.30, 0.05, 0.05), qc_after=0.08),  # fell below PTQ
        make_summary(variant="yolo10s", method="ema", seed=0, maps=(0.3, 0.40, 0.41), qc_after=0.42),
    ]
    fp = {"yolo10n": {"map50_95": 0.385, "map50": 0.6, "dataset_fingerprint": "data-1"}}
    comparison = build_comparison(runs, fp)
    n, s = comparison.variants
    assert (n.variant, s.variant) == ("yolo10n", "yolo10s")
    assert [r.method for r in n.rows][:2] == ["baseline", "baseline+QC"]
    assert len(n.rows) == 12 and {r.method for r in n.rows} == {"baseline", "baseline+QC", "ema", "ema+QC"}

    [baseline, baseline_bn, baseline_qc], [ema, ema_bn, ema_qc] = n.grid
    assert (ema.method, ema.seeds, ema.failed) == ("ema", 3, 1)
    assert ema.mean_final == pytest.approx(statistics.fmean([0.30, 0.26, 0.10]))
    assert ema.std_final == pytest.approx(statistics.stdev([0.30, 0.26, 0.10]))
    assert ema_qc.method == "ema+QC" and ema_qc.mean_final == pytest.approx(statistics.fmean([0.31, 0.27, 0.12]))
    assert (baseline.seeds, baseline.failed, baseline.std_final) == (1, 1, None) and ema_bn.seeds == 0
    against = {c.contrast: c for c in n.against_baseline}
    assert against["ema - baseline"].seeds == [0] and against["ema - baseline"].mean == pytest.approx(0.25)
    assert against["ema+QC - baseline"].differences == pytest.approx([0.31 - 0.05])
    collapsed = next(r for r in n.rows if r.seed == 2 and r.method == "ema")
    assert collapsed.failed_rules == ["collapsed"] and (collapsed.best_from_epoch, collapsed.final_from_epoch) == (1, 3)

    flagged = next(r for r in n.rows if r.seed == 3 and r.method == "ema")
    assert not flagged.comparable and "training profile other" in flagged.not_comparable_reason
    qc_row = next(r for r in n.rows if r.seed == 0 and r.method == "ema+QC")
    assert qc_row.qc_delta == pytest.approx(0.01) and qc_row.final == 0.31
    assert s.fp_map50_95 is None and s.grid[1][0].std_final is None

    table = comparison.rows()
    assert table[0]["method"] == "FP" and table[0]["final"] == 0.385
    frame = comparison.to_dataframe()
    assert len(frame) == len(table) == 1 + 12 + 2
    assert Comparison.from_dict(comparison.to_dict()) == comparison

    markdown = comparison.to_markdown()
    assert "### yolo10n" in markdown and "### yolo10s" in markdown
    assert "| ema+QC | 0 | completed-success |" in markdown
    assert "| ema | 2 | completed-failed | 0.2000 | 0.3000 (1-3) | 0.1000 (3-5) |" in markdown
    assert "no: training profile other" in markdown
    assert f"{statistics.fmean([0.30, 0.26, 0.10]):.4f} ± {statistics.stdev([0.30, 0.26, 0.10]):.4f}" in markdown


def test_empty_comparison_renders():
    comparison = build_comparison([])
    assert comparison.variants == [] and comparison.reference is None
    assert comparison.to_dataframe().empty
    assert comparison.to_markdown() == "No runs to compare yet.\n"


def test_onnx_map_lands_on_the_row_it_was_exported_from_and_sizes_reach_the_report():
    from qat_assets.core.comparison import deployment_markdown

    runs = group()
    exported = {
        "variant": "yolo10n", "method": "ema", "seed": 1, "source": "qc", "w4_bytes": 3_000_000,
        "fp_bytes": 9_000_000, "onnx_metrics": {"map50_95": 0.3141}, "torch_metrics": {"map50_95": 0.3140},
        "parity": {"max_rel": 2e-6}, "failures": [],
    }
    comparison = build_comparison(runs, onnx_results=[exported])
    rows = {(r["method"], r["seed"]): r["onnx_map50_95"] for r in comparison.rows()}
    assert rows[("ema+QC", 1)] == 0.3141
    assert all(value is None for key, value in rows.items() if key != ("ema+QC", 1))
    assert "ONNX mAP" in comparison.to_markdown() and "0.3141" in comparison.to_markdown()
    # An export of the plain QAT checkpoint belongs to the QAT row.
    comparison = build_comparison(runs, onnx_results=[{**exported, "source": "qat"}])
    assert {(r["method"], r["seed"]): r["onnx_map50_95"] for r in comparison.rows()}[("ema", 1)] == 0.3141
    section = deployment_markdown([exported])
    assert "3.00 MB" in section and "9.00 MB" in section and "0.33" in section and "met" in section
    assert "No `{v}/onnx_model`" in deployment_markdown([])


def recorded_qat_sidecar(method: str, seed: int, batches: list[int]) -> dict:
    """A QAT sidecar as run_qat writes it, for a run whose trained epochs ran at `batches` (smoke: configured 8)."""
    settings = load_settings({"profile": "smoke"}, environ={})
    history = [{"epoch": 0, "map50_95": 0.30, "map50": 0.5, "precision": 0.5, "recall": 0.5}] + [
        {"epoch": e, "map50_95": 0.31 + 0.01 * e, "map50": 0.5, "precision": 0.5, "recall": 0.5, "batch": b, "seconds": 1.0}
        for e, b in enumerate(batches, start=1)
    ]
    return {
        "variant": "yolo10n", "method": method, "seed": seed, "names": ["a"], "fp_map50_95": 0.35,
        "pretrained_sha256": "fp", "sha256": f"qat-{method}-{seed}", "quantization": {"options": {}},
        "quantization_counts": {}, "settings": settings.model_dump(mode="json"), "ema": {}, "resume": "fresh start",
        "profile_fingerprint": settings.training_profile_fingerprint(), "device": "cuda:0",
        "evaluation": evaluation_settings(settings.imgsz, settings.batch), "planned_epochs": len(batches),
        "history": history, "ptq_map50_95": 0.30, "training_batch": training_batch(history, settings.batch),
    }


def test_a_run_whose_batch_ultralytics_halved_is_not_comparable_with_runs_at_the_configured_batch():
    settings = load_settings({"profile": "smoke"}, environ={})
    recorded = {(m, s): recorded_qat_sidecar(m, s, [8, 8]) for m in ("baseline", "ema") for s in (0, 1)}
    recorded[("ema", 1)] = recorded_qat_sidecar("ema", 1, [4, 4])  # out of memory at batch 8 in its first epoch
    summaries = [build_run_summary(sidecar, None, partition_key=f"{m}|{s}", settings=settings,
                                   dataset={"fingerprint": "data-1"}) for (m, s), sidecar in recorded.items()]
    assert recorded[("ema", 1)]["training_batch"] == {"configured": 8, "used": [4], "halved": True}
    assert summaries[-1].history[1].batch == 4
    problems = find_non_comparable(summaries)
    assert list(problems) == [("yolo10n", "ema|1")]
    assert "trained at batch [4] (Ultralytics halved it after running out of memory) != [8]" in problems[("yolo10n", "ema|1")]
    comparison = build_comparison(summaries)
    assert {r.method for r in comparison.variants[0].rows if not r.comparable} == {"ema", "ema+QC", "ema+BN"}
    assert "trained at batch [8]" in comparison.to_markdown()
    # Without the halved run, the same runs compare; a resumed run that halved in one epoch only is flagged too.
    assert find_non_comparable(summaries[:3]) == {}
    resumed = build_run_summary(recorded_qat_sidecar("ema", 1, [8, 4]), None, partition_key="ema|1", settings=settings,
                                dataset={"fingerprint": "data-1"})
    assert "trained at batch [4, 8]" in find_non_comparable([*summaries[:3], resumed])[("yolo10n", "ema|1")]


def test_each_seeds_ema_minus_baseline_carries_its_within_seed_interval_next_to_the_across_seed_one():
    recorded = {0: within_seed(0.012, 0.004, 0.020, epoch=3, seed=0), 1: within_seed(-0.003, -0.011, 0.005, seed=1),
                2: within_seed(0.5, 0.4, 0.6, seed=2)}
    runs = [make_summary(method=m, seed=s, maps=maps, within_seed=recorded[s])
            for s, (ema, base) in {0: (0.32, 0.30), 1: (0.29, 0.30)}.items()
            for m, maps in (("ema", (0.2, 0.31, ema, ema)), ("baseline", (0.2, 0.31, base, base)))]
    # Seed 2's ema run is incomplete: no paired difference, so no within-seed row either.
    runs += [make_summary(method="ema", seed=2, maps=(0.2, 0.3), planned_epochs=3, within_seed=recorded[2]),
             make_summary(method="baseline", seed=2, within_seed=recorded[2])]
    comparison = build_comparison(runs)
    [variant] = comparison.variants
    assert [(r.seed, r.within_seed) for r in variant.within_seed] == [(0, recorded[0]), (1, recorded[1])]
    assert [r.difference for r in variant.within_seed] == pytest.approx([0.02, -0.01])
    assert Comparison.from_dict(comparison.to_dict()) == comparison

    markdown = comparison.to_markdown()
    section = markdown[markdown.index("**Within-seed uncertainty"):]
    assert "(val-image sampling only, not training noise)" in section
    assert "| 0 | +0.0200 | +0.0120 (epoch 3) | +0.0040 to +0.0200 | within seed: val images only |" in section
    assert "| 1 | -0.0100 | -0.0030 (epoch 3) | -0.0110 to +0.0050 | within seed: val images only |" in section
    across = next(c for c in variant.against_baseline if c.contrast == "ema - baseline")
    assert (f"| across 2 seed(s) | +0.0050 | – | {across.ci_low:+.4f} to {across.ci_high:+.4f} | across seeds: "
            "t-interval, training noise included |") in section
    assert "64 × 1000 (seed 1)" in section
    # Summaries from before the bootstrap existed: the section says it is not recorded.
    older = build_comparison([r.model_copy(update={"within_seed": None}) for r in runs])
    assert older.variants[0].within_seed == [] and "not recorded" in older.to_markdown()
