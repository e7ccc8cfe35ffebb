"""A TCP forwarder to a server that a test can take down and bring back: a dashboard outage as its clients see it."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Iterator


class OutageProxy:
    """Forwards 127.0.0.1:`port` to `target`. While `down`, every connection is refused at once (closed on
    accept) and the forwarded ones are cut, as when the server's port is closed."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.down = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.refused = 0

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the proxy is done
                return
            if self.down.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open_sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                self.close(end)

    def close(self, end: socket.socket) -> None:
        with self.lock:
            self.open_sockets.discard(end)
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()

    def take_down(self) -> None:
        self.down.set()
        with self.lock:
            cut = list(self.open_sockets)
        for end in cut:
            self.close(end)

    def bring_back(self) -> None:
        self.down.clear()


@contextmanager
def outage_proxy(address: str) -> Iterator[OutageProxy]:
    """A proxy in front of `address` (http://HOST:PORT); its clients use http://127.0.0.1:{proxy.port}."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    proxy = OutageProxy((host, int(port)))
    thread = threading.Thread(target=proxy.serve, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        try:
            proxy.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in serve (close alone does not)
        except OSError:
            pass
        proxy.listener.close()
        proxy.take_down()
        thread.join(timeout=5)
