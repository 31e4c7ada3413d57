"""Small helpers shared by tests that start a local HTTP server (MLflow UI / tracking server)."""

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(base: str, proc: subprocess.Popen, what: str, seconds: float = 90) -> None:
    """Poll ``base``/health until it answers; fail if ``proc`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited"
            assert time.monotonic() < deadline, f"{what} did not answer within {seconds:g} s"
            time.sleep(0.3)
