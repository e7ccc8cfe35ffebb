"""A worker's Pipes messages are parsed only once their whole line is in the file."""

from __future__ import annotations

import json
import threading
import time

from qat_assets.execution.pipes_messages import complete_lines


def collect(path, stop: threading.Event) -> tuple[list[str], threading.Thread]:
    lines: list[str] = []
    thread = threading.Thread(target=lambda: lines.extend(complete_lines(str(path), stop.is_set)), daemon=True)
    thread.start()
    return lines, thread


def test_a_message_written_in_two_parts_is_read_once_whole(tmp_path):
    path = tmp_path / "messages"
    message = json.dumps({"method": "report_custom_message", "params": {"history": list(range(3000))}}) + "\n"
    path.write_text("")
    stop = threading.Event()
    lines, thread = collect(path, stop)
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(message[:5000])
        stream.flush()
        time.sleep(0.2)  # the reader reaches the end of the file in the middle of the message
        stream.write(message[5000:])
    stop.set()
    thread.join(timeout=10)
    assert lines == [message]
    assert json.loads(lines[0])["params"]["history"][-1] == 2999


def test_lines_written_just_before_the_worker_exits_are_all_read(tmp_path):
    path = tmp_path / "messages"
    path.write_text("".join(f'{{"n": {n}}}\n' for n in range(100)) + '{"unterminated": true}')
    stop = threading.Event()
    stop.set()  # the worker has exited before the reader looks at the file
    lines, thread = collect(path, stop)
    thread.join(timeout=10)
    assert [json.loads(line) for line in lines] == [{"n": n} for n in range(100)] + [{"unterminated": True}]
