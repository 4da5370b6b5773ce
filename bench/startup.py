"""Start-up: idle RSS and time to listening of ``python vmqapi.py``, next to mosquitto.

    python bench/startup.py [--rounds N] [--before REV]

Each round starts the broker in a fresh data dir on free loopback ports, times it from the
start until its MQTT port accepts a connection, waits a second, and reads VmRSS from
/proc/<pid>/status. ``python vmqapi.py`` is measured as a user starts it (the .pyc that
the first start writes next to the module is used from the second on), again with
PYTHONDONTWRITEBYTECODE=1 (no .pyc can be kept), and, with ``--before REV``, the vmqapi.py
of that git revision the same way. mosquitto is measured when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDLE_WAIT = 1.0  # s after listening before RSS is read: the node has settled
START_TIMEOUT = 20.0  # s a broker may take to listen before the round fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def measure(argv: list[str], port: int, cwd: str, env: dict) -> tuple[float, float]:
    """Start ``argv``; return (seconds to listening on ``port``, idle RSS in MB)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not accepts(port):
            if proc.poll() is not None or time.monotonic() - start > START_TIMEOUT:
                raise RuntimeError(f"{argv[0]} did not start (exit {proc.returncode})")
            time.sleep(0.002)
        elapsed = time.monotonic() - start
        time.sleep(IDLE_WAIT)
        return elapsed, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def vmqapi_round(folder: str, env: dict) -> tuple[float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        argv = [sys.executable, "vmqapi.py", "--data-dir", data, "--set", f"listener.tcp.default=127.0.0.1:{port}",
                "--set", "listener.http.default=127.0.0.1:0"]
        return measure(argv, port, folder, env)


def mosquitto_round(binary: str) -> tuple[float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        conf = os.path.join(folder, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        return measure([binary, "-c", conf], port, folder, dict(os.environ))


def before_copy(rev: str, folder: str) -> None:
    """Write the vmqapi.py of git revision ``rev`` into ``folder``."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:vmqapi.py"], capture_output=True, check=True).stdout
    with open(os.path.join(folder, "vmqapi.py"), "wb") as f:
        f.write(source)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also measure vmqapi.py of this git revision")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        # A copy, so the .pyc the first start writes lands in a scratch __pycache__.
        shutil.copy(os.path.join(ROOT, "vmqapi.py"), scratch)
        user = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        no_pyc = {**user, "PYTHONDONTWRITEBYTECODE": "1"}
        vmqapi_round(scratch, user)  # the first start writes the .pyc, as a user's first start does
        bare = os.path.join(scratch, "no-pyc")
        os.mkdir(bare)
        shutil.copy(os.path.join(ROOT, "vmqapi.py"), bare)
        cases = [("python vmqapi.py", lambda: vmqapi_round(scratch, user)),
                 ("python vmqapi.py, no .pyc (PYTHONDONTWRITEBYTECODE=1)", lambda: vmqapi_round(bare, no_pyc))]
        if ns.before:
            old = os.path.join(scratch, "before")
            os.mkdir(old)
            before_copy(ns.before, old)
            cases.append((f"python vmqapi.py at {ns.before}", lambda: vmqapi_round(old, user)))
        mosquitto = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
        if mosquitto:
            version = subprocess.run([mosquitto, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
            cases.append((version.replace(" running on", "").strip() or "mosquitto", lambda: mosquitto_round(mosquitto)))
        print(f"| broker (median of {ns.rounds}) | idle RSS, MB | start to listening, s |")
        print("|---|---:|---:|")
        results = {}
        for name, run in cases:
            rounds = [run() for _ in range(ns.rounds)]
            times, sizes = zip(*rounds)
            results[name] = {"rss_mb": statistics.median(sizes), "seconds": statistics.median(times)}
            print(f"| {name} | {statistics.median(sizes):.1f} | {statistics.median(times):.3f} |", flush=True)
        if not mosquitto:
            print("(mosquitto is not installed: apt-get install mosquitto to compare)")
        print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
