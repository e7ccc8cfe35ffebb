"""Reading a local worker's Pipes messages from a file, one complete line at a time.

Dagster 1.13's file message reader tails the file with `readline()` and parses whatever comes back. When it
catches up with the worker in the middle of a long message (the final result of a QAT step, ~7 KB, reaches
the file in more than one write), `readline()` returns the part written so far, `json.loads` fails, the
reader thread stops, and the step fails with "the worker exited without a result" although the worker
succeeded. It happened to one of eight partition runs of a ladder with two heavy steps at once. This reader
keeps a partial line until its newline arrives, and reads the file to its end after the worker exits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from dagster import PipesMessageHandler, PipesMessageReader
from dagster_pipes import PipesDefaultMessageWriter, PipesParams

POLL_SECONDS = 0.01


def complete_lines(path: str, should_stop: Callable[[], bool]) -> Iterator[str]:
    """Each line appended to `path` once its newline is there, until `should_stop()` and the file is read out.

    The flag is read before each read: whatever the writer wrote before the flag was set is read after it.
    A last line without a newline is handed over at the end as it is.
    """
    pending = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            stopping = should_stop()
            chunk = stream.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif stopping:
                if pending:
                    yield pending
                return
            else:
                time.sleep(POLL_SECONDS)


class CompleteLineMessageReader(PipesMessageReader):
    """Messages from a temporary file the worker appends to, parsed one complete line at a time."""

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "messages")
            open(path, "w", encoding="utf-8").close()
            closed = threading.Event()
            reader = threading.Thread(target=self._read, args=(path, handler, closed.is_set), daemon=True)
            reader.start()
            try:
                yield {PipesDefaultMessageWriter.FILE_PATH_KEY: path}
            finally:
                closed.set()
                reader.join()

    def _read(self, path: str, handler: PipesMessageHandler, should_stop: Callable[[], bool]) -> None:
        try:
            for line in complete_lines(path, should_stop):
                handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception(f"{type(self).__name__} reader thread", sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a local temporary file, one complete line at a time."
