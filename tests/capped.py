"""A node in a child process under an address-space cap, for attack tests that measure memory.

A regression that makes the node hold what an attacker sends then fails the test (the node
hits its cap) instead of taking the machine down.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time

import vmqapi
from conftest import ROOT, vmqapi_command

CAP = 1 << 30  # bytes of address space: well above an idle node (~300 MB of it), far below the attacks


def child_setup(cap=None, nofile=None, umask=None):
    """Return a preexec_fn: address-space cap, descriptor limit, umask, default signal dispositions."""
    def apply():
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        if umask is not None:
            os.umask(umask)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):  # never the test runner's dispositions
            signal.signal(sig, signal.SIG_DFL)
    return apply


class CappedNode:
    """A running child node: its pid, ports, RSS and log."""

    def __init__(self, proc, info, log_path):
        self.proc, self.info, self.log_path = proc, info, log_path
        self.pid = proc.pid

    def port(self, kind):
        return next(x["port"] for x in self.info["listeners"] if x["type"] == kind)

    def rss(self):
        """Resident set size in bytes, from /proc/<pid>/status."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def metric(self, name):
        """Read one counter from /metrics (noauth by default), summed over its labels."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port('http')}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(int(float(line.split()[-1])) for line in text.splitlines()
                   if line.startswith("vernemq_" + name) and (line[len("vernemq_" + name)] in " {"))


@contextlib.contextmanager
def capped_node(data_dir, *settings, cap=CAP, nofile=None, umask=None, env=None, timeout=30, args=()):
    """Start ``python vmqapi.py`` on port 0 with ``--set`` items; kill it (by its pid) at the end.

    ``cap`` (None: none) bounds its address space; the node itself creates ``data_dir``;
    ``args`` go before the ``--set`` items (``("--config", path)``: those override the file).
    """
    os.makedirs(os.path.dirname(os.path.abspath(str(data_dir))), exist_ok=True)
    log_path = os.path.join(os.path.dirname(str(data_dir)), os.path.basename(str(data_dir)) + ".log")
    cmd = [*vmqapi_command("--data-dir", str(data_dir), *args),
           "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.tcp.default=127.0.0.1:0",
           "--set", "listener.vmq.clustering=127.0.0.1:0"]
    for item in settings:
        cmd += ["--set", item]
    with open(log_path, "w") as log:  # a file, not a pipe: a chatty node never blocks on a full pipe
        full_env = dict(os.environ, MALLOC_ARENA_MAX="2", **(env or {}))  # address space threads do not inflate
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                preexec_fn=child_setup(cap, nofile, umask))
    try:
        deadline = time.monotonic() + timeout
        while True:
            info = vmqapi.read_node_file(str(data_dir))
            if info and info.get("pid") == proc.pid:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as fh:
                    raise AssertionError(f"node did not start: {fh.read()}")
            time.sleep(0.05)
        yield CappedNode(proc, info, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(20)
