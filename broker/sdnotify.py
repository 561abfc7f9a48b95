"""systemd notifications (``Type=notify``): READY, STATUS, WATCHDOG, STOPPING.

A few lines of the documented datagram protocol instead of a dependency. Silent
no-op when ``NOTIFY_SOCKET`` is unset (not started by systemd).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        #: Seconds between WATCHDOG=1 pings (half the configured timeout), or None.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY="1", STATUS="serving")``."""
        if not self.address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(payload, self.address)
            except OSError:
                return False
        return True
