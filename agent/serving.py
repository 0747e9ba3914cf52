"""An ASGI app served on a free loopback port from a thread of this process: for tests and benchmarks that drive a
browser or network clients against the same process's runs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp


@contextmanager
def serving_in_thread(app: ASGIApp, timeout: float = 30.0) -> Iterator[str]:
    """`app` served by uvicorn on 127.0.0.1 for as long as the block runs: its base URL, 'http://127.0.0.1:PORT/'."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
        finally:
            server.should_exit = True
            thread.join(timeout)
