"""A multi-process launch's process, watched: one line and a clean exit status when it or a peer dies (no JAX).

JAX's distributed runtime ends a process whose peer died with ``abort()`` and a C++ stack
trace: at once when the coordinator (process 0) is gone, after the heartbeat timeout when any
other process is. No Python code runs then, so each tool runs its work in a child process
(the same command, marked by ``KNNLM_SUPERVISED``) and this parent relays the child's output,
keeps the runtime's own log lines out of the terminal (they go to a log file), and turns the
child's death by a signal into one line naming the process that stopped, and exit status 3.
The child dies with its parent (``PR_SET_PDEATHSIG``), so killing the launched command kills
the work too.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

ENV = "KNNLM_SUPERVISED"
CONNECTED = b"knnlm-supervisor: connected\n"  # the child's word that the runtime started (never shown)
PEER_STOPPED = 3  # the exit status when this process or a peer of its launch died

# the runtime's log lines: glog's "E1203 15:09:07.644 21908 file.cc:123] ..." and the crash report
_RUNTIME = re.compile(rb"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.\-]+:\d+\]|\s+@ +0x|\*\*\* |terminate called|"
                      rb"  what\(\):|\[Gloo\]|Additional GRPC error information|:[A-Z_]+:Error received from peer)")
_OURS = re.compile(rb"^[\w.\-]+: (error|interrupted)")  # a tool's own one-line message: always shown
# a line after which the process is dying: everything that follows belongs to the log
_DYING = re.compile(rb"Polled an error|heartbeat timeout|unhealthy|Terminating process|Check failure|terminate called")
_PEER = re.compile(rb"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)")
_LEADER = re.compile(rb"leader task was preempted|Failed to send RPC to coordination service|"
                     rb"Failed to connect to coordination service")


def is_child() -> bool:
    return os.environ.get(ENV) == "1"


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux; elsewhere a no-op)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Relay:
    """Copies the child's stderr to ours, except the runtime's lines, which go to ``log``."""

    def __init__(self, source, log_path: str):
        self.source, self.log_path = source, log_path
        self.dying, self.runtime, self.connected = False, bytearray(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self, line: bytes) -> None:
        if line == CONNECTED:
            self.connected = True
        elif not _OURS.match(line) and (self.dying or _RUNTIME.match(line)):
            self.runtime += line
            self.dying = self.dying or bool(_DYING.search(line))
        else:
            os.write(2, line)

    def _run(self) -> None:
        pending = b""
        while chunk := os.read(self.source.fileno(), 65536):
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._line(line + b"\n")
            if pending and not self.dying and not _RUNTIME.match(pending) and len(pending) > 24:
                os.write(2, pending)  # a progress bar's "\r..." update: no newline is coming
                pending = b""
        if pending:
            self._line(pending)

    def finish(self) -> str | None:
        """Wait for the child's stderr to close; the log file's path if the runtime said anything."""
        self.thread.join()
        if not self.runtime:
            return None
        with open(self.log_path, "wb") as f:
            f.write(bytes(self.runtime))
        return self.log_path

    def cause(self, index: int, coordinator: str | None) -> str:
        """Why the child died, from the runtime's lines."""
        if not self.connected and b"DEADLINE_EXCEEDED" in self.runtime:
            return (f"the launch's processes did not all reach the coordinator {coordinator or ''} in time "
                    "(start every process of the launch with the same --coordinator and --num_processes; "
                    "process 0 must be reachable at that address)")
        if m := _PEER.search(self.runtime):
            return f"process {int(m.group(1) or m.group(2))} stopped (no heartbeat)"
        if index != 0 and _LEADER.search(self.runtime):
            return "process 0 (the coordinator) stopped"
        return ""


def supervise(prog: str, module: str, argv: list[str], index: int | None, coordinator: str | None = None) -> int:
    """Run ``python -m module argv`` as the watched child of this process; its exit status, or 3
    with one line on stderr if it died by a signal."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package's parent
    env = dict(os.environ, **{ENV: "1", "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)})
    child = subprocess.Popen([sys.executable, "-m", module, *argv], env=env, stderr=subprocess.PIPE,
                             preexec_fn=_die_with_parent)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child too: it says so itself
    try:
        relay = _Relay(child.stderr, os.path.join(tempfile.gettempdir(),
                                                  f"knnlm-{prog}-process-{index}-{child.pid}.log"))
        status = child.wait()
        log = relay.finish()
    finally:
        signal.signal(signal.SIGINT, previous)
    if status >= 0:
        return status
    cause = relay.cause(index or 0, coordinator)
    if not cause:
        name = signal.Signals(-status).name
        cause = f"killed ({name}{', out of memory?' if name == 'SIGKILL' else ''})" \
            if name in ("SIGKILL", "SIGTERM") else f"crashed ({name})"
    details = f" (the runtime's log: {log})" if log else ""
    who = f"process {index}" if index is not None else "this process"  # SLURM or a TPU pod numbered it
    sys.stderr.write(f"{prog}: error: {who}: {cause}; run the same commands again to resume{details}\n")
    return PEER_STOPPED
