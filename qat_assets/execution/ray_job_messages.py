"""Reading a Ray job's Pipes messages from its log, whole lines only, and the rest from the full log at the end.

dagster-ray 0.4.8's reader splits each chunk of the log stream on newlines and parses every piece. A
message that reaches the stream in two chunks (a QAT step's ~7 KB final result does) becomes two broken
lines, both forwarded to stdout as plain text, and a step whose worker succeeded ends "without a result";
the stream also ends with a last line that has no newline yet, or breaks when the dashboard restarts. This
reader keeps a partial line until its newline arrives, follows a broken stream again (from the start of
the log, skipping the lines already read), and once the step stops waiting for the job it reads the job's
full log and handles the Pipes messages the stream did not deliver (the log holds them in the order the
stream does, so those are the ones after the count handled).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from dagster import PipesMessageHandler
from dagster_ray import PipesRayJobMessageReader

from qat_assets.execution.pipes_messages import POLL_SECONDS
from qat_assets.execution.ray_jobs import is_pipes_message

# After the step stops waiting for the job, how long the stream may take to deliver the rest before the
# full log is read instead (Ray closes the stream once the job ended and its log is read out).
STREAM_GRACE_S = 10.0
RECONNECT_S = 5.0


class CompleteLineRayJobMessageReader(PipesRayJobMessageReader):
    """dagster-ray's reader of a Ray job's log, parsing whole lines only and completed from the full log.

    `log` is the step's Dagster logger: what the reader could not read is said in the run log.
    """

    def __init__(self, log: Any):
        super().__init__()
        self.log = log
        self.handled = 0  # Pipes messages handled so far, in log order
        self.lines_read = 0  # complete lines of the log read so far: a stream followed again skips them

    def handle_job_logs(self, handler: PipesMessageHandler) -> None:
        try:
            while not self.messages_are_readable({}):  # the job id comes with report_launched
                if self.session_closed.is_set():
                    return
                time.sleep(POLL_SECONDS)
            self.thread_ready.set()
            while True:
                try:
                    asyncio.run(self.follow_stream(handler))
                    break
                except Exception as exc:  # the stream broke (dashboard restart): follow it again from where it was
                    self.log.warning(f"the log stream of Ray job {self.job_id} broke ({exc}); following it again "
                                     f"in {RECONNECT_S:.0f}s (what it misses is read from the full log at the end)")
                    if self.session_closed.wait(RECONNECT_S):
                        break
            self.session_closed.wait()
            self.read_the_rest(handler)
        finally:
            self.completed.set()

    async def follow_stream(self, handler: PipesMessageHandler) -> None:
        """Handle each complete line of the stream until it ends, or until STREAM_GRACE_S after the session closed.

        The next chunk is awaited as a task, not with a timeout: cancelling it would close the stream."""
        stream = self.client.tail_job_logs(self.job_id)  # from the start of the log
        pending, next_chunk, closed_at, line_index = "", None, None, 0
        try:
            while True:
                if next_chunk is None:
                    next_chunk = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait({next_chunk}, timeout=0.5)
                if not done:
                    if self.session_closed.is_set():
                        closed_at = closed_at or time.monotonic()
                        if time.monotonic() - closed_at > STREAM_GRACE_S:
                            return
                    continue
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    return
                next_chunk = None
                *lines, pending = (pending + chunk).split("\n")
                for line in lines:
                    if line_index >= self.lines_read:
                        self.handle_line(handler, line)
                        self.lines_read += 1
                    line_index += 1
        finally:
            if next_chunk is not None:
                next_chunk.cancel()
                await asyncio.wait({next_chunk})
            await stream.aclose()

    def handle_line(self, handler: PipesMessageHandler, line: str) -> None:
        if is_pipes_message(line):
            handler.handle_message(json.loads(line))
            self.handled += 1
        elif line:
            print(line, file=sys.stdout)  # as dagster-ray does: the worker's own output goes to the step's stdout

    def read_the_rest(self, handler: PipesMessageHandler) -> None:
        """Handle the Pipes messages of the job's full log after the `handled` ones the stream delivered."""
        try:
            text = self.client.get_job_logs(self.job_id)
        except Exception as exc:
            self.log.warning(f"could not read the full log of Ray job {self.job_id} ({exc}); messages the log "
                             "stream did not deliver are lost")
            return
        messages = [json.loads(line) for line in text.splitlines() if is_pipes_message(line)]
        if len(messages) > self.handled:
            self.log.info(f"{len(messages) - self.handled} Pipes message(s) of Ray job {self.job_id} read from its "
                          "full log: its log stream had not delivered them whole")
        for message in messages[self.handled:]:
            handler.handle_message(message)
            self.handled += 1
