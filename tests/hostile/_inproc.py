"""The real socket server in this process, on a temporary socket, for hostile unit tests.

The event loop runs in a background thread so the test talks to it with the real
(blocking) client, exactly as ``sbroker`` does; the peer is this process (root).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.server import Server


@contextmanager
def serving(manager: Any) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """Yield ``(socket_path, loop)`` while a :class:`Server` for ``manager`` serves."""
    socket_path = str(Path(tempfile.mkdtemp(prefix="sbhostile-")) / "broker.sock")
    loop = asyncio.new_event_loop()
    server = Server(manager, socket_path)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield socket_path, loop
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
