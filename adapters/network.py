"""Fast, bounded network probes, so that offline runs fail in seconds with one line instead of hanging.

Model hubs and dataset servers are often unreachable (air-gapped clusters, this project's CI).
Downloads are attempted only after a short TCP probe of their host answers; with an HTTP(S)
proxy configured the probe is skipped and the socket timeout bounds the download.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout while torchvision downloads
CONNECT_TIMEOUT_S = 3.0  # reachability probe of the download host before any download


def proxied() -> bool:
    """Whether an HTTP(S) proxy is configured (a direct TCP probe then says nothing)."""
    return any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy"))


def reachable(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` s (DNS included)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # bounds a hanging DNS lookup too
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def hub_offline(host: str) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, or no proxy is configured and ``host`` does not answer."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    return not proxied() and not reachable(host)


def fetch_online(fetch: Callable[[], object], host: str, port: int = 443) -> None:
    """Run ``fetch`` (a torchvision download) if ``host`` answers; short socket timeout, restored after.

    Raises OSError at once when the host is unreachable (offline), so a missing dataset fails in
    seconds. With an HTTP(S) proxy configured the probe is skipped and the socket timeout bounds it.
    """
    if not proxied() and not reachable(host, port):
        raise OSError(f"{host}:{port} unreachable (no TCP connection within {CONNECT_TIMEOUT_S:g} s)")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetch()
    finally:
        socket.setdefaulttimeout(old)


__all__ = ["CONNECT_TIMEOUT_S", "DOWNLOAD_TIMEOUT_S", "fetch_online", "hub_offline", "proxied", "reachable"]
