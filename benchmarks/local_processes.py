"""Launching one command as P processes on localhost (a jax.distributed launch), for the benchmarks."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], processes: int, log_prefix: str | None, cwd: str, niceness=None) -> list[subprocess.Popen]:
    """Start ``cmd`` as ``processes`` processes (coordinator on 127.0.0.1); logs to ``<log_prefix>.<i>.log``.
    ``niceness``: per process, e.g. ``[0, 19]`` to slow process 1 down."""
    port = free_port()
    procs = []
    for p in range(processes):
        extra = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
                                           "--process_id", str(p)]
        out = open(f"{log_prefix}.{p}.log", "w") if log_prefix else subprocess.DEVNULL
        prefix = ["nice", "-n", str(niceness[p])] if niceness and niceness[p] else []
        procs.append(subprocess.Popen(prefix + cmd + extra, stdout=out, stderr=subprocess.STDOUT, cwd=cwd))
    return procs
