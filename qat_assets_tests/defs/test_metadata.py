"""QAT metadata of a run validated at a sparse cadence: best and final come from the validated epochs."""

from qat_assets.core.settings import load_settings
from qat_assets.defs.metadata import qat_metadata
from qat_assets_tests.core.test_verdict import sparse_qat_sidecar


def test_qat_metadata_reads_best_and_final_from_the_validated_epochs():
    result = {
        **sparse_qat_sidecar(load_settings({"profile": "smoke"}, environ={})), "checkpoint": "/x/qat_checkpoint.pt",
        "execution": {}, "trajectory": {}, "one_to_one": {"fp": {"map50_95": 0.3}, "final": None},
    }
    result["history"][5]["map50_95"] = 0.33
    metadata = qat_metadata(result)
    assert (metadata["best_map50_95"], metadata["best_epoch"]) == (0.36, 4)
    assert (metadata["final_map50_95"], metadata["final_epoch"]) == (0.33, 5)
    assert metadata["validated_epochs"] == "3 of 5 trained"
    rows = metadata["history"].value.records
    assert [row.data["map50_95"] for row in rows] == [0.3, None, 0.34, None, 0.36, 0.33]
    assert [row.data["validation_seconds"] for row in rows] == [1.0, None, 1.0, None, 1.0, 1.0]
