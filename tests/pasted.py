"""README command blocks run as a user pastes them: the README's ports made free ones, one bash script.

``commands`` turns a README block's ``$`` lines into shell lines (``python vmqapi.py`` run by this
interpreter, every ``127.0.0.1:PORT`` by a port free now) and collects the lines the README prints
after each; ``pasted`` runs them as one script and, whatever happens, stops the nodes whose pids the
script wrote to ``pids`` (SIGTERM) and then everything left in the shell's own process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

from capped import child_setup
from conftest import ROOT

ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")


def free_ports(lines):
    """A free port for each port the lines name (each held until all are chosen: no two the same)."""
    ports = {}
    with contextlib.ExitStack() as held:
        for port in sorted({int(p) for p in ADDRESS.findall("\n".join(lines))}):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports[port] = s.getsockname()[1]
    return ports


def commands(lines, ports, prefix="    $ "):
    """Return the block's commands as shell lines, each with its README line, and the lines it prints."""
    python = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(ROOT, 'vmqapi.py'))}"
    found, expected = [], []
    for n, line in enumerate(lines):
        if not line.startswith(prefix):
            continue
        command = ADDRESS.sub(lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", line[6:])
        found.append(command.replace("python vmqapi.py", python, 1))
        for following in lines[n + 1:]:
            if not following.startswith("    ") or following.startswith("    $"):
                break
            expected.append(following[4:])
    return found, expected


@contextlib.contextmanager
def pasted(tmp_path, script):
    """Run ``script`` (lines) with bash in ``tmp_path``; yield the shell; stop what it started."""
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        shell = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=tmp_path, stdout=out, stderr=err,
                                 preexec_fn=child_setup(), start_new_session=True)
    try:
        yield shell
    finally:
        pids = (tmp_path / "pids").read_text().split() if (tmp_path / "pids").exists() else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        try:
            shell.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the shell's own group: only what it started
                os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(10)
