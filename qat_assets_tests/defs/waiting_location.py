"""A code location for the run-monitoring test: one job, tagged as the heavy jobs are, whose run records its
process ids (the run worker's and the code server's that launched it) and then waits; a Dagster run
retry of it finishes at once."""

import os
import time
from pathlib import Path

from dagster import AssetExecutionContext, Definitions, asset, define_asset_job, in_process_executor

from qat_assets.defs.automation.jobs import monitored_run_tags

PID_DIR_ENV = "RUN_MONITORING_TEST_PID_DIR"


@asset
def waits(context: AssetExecutionContext) -> None:
    pids = Path(os.environ[PID_DIR_ENV]) / f"{context.run.run_id}.pids"
    pids.write_text(f"{os.getpid()} {os.getppid()}")
    if "dagster/retry_number" not in context.run.tags:
        time.sleep(600)


defs = Definitions(
    assets=[waits],
    jobs=[define_asset_job("waiting_job", selection=[waits], executor_def=in_process_executor,
                           tags=monitored_run_tags("smoke"))],
)
