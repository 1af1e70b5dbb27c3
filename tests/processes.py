"""Child processes of the test harnesses (localstripe, nats-server; benchmarks use the latter):
started with their output appended to a log file, stopped with SIGTERM and, when that is not
enough, SIGKILL."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def start_logged(command: list[str], log_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """``command`` in a child process, its stdout and stderr appended to ``log_path``."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, **popen)


def stop(process: subprocess.Popen[bytes] | None, *, seconds: float) -> None:
    """SIGTERM, and SIGKILL when ``process`` has not exited ``seconds`` later; reaped either way
    (nothing to do when there is none or it has exited)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=seconds)
