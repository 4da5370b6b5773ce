"""The CLI: api-key without a node, commands on the live node, exit codes, node processes."""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, Client, basic, run_cli, vmqapi_command, vmqapi_env
import vmqapi


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def test_api_key_commands_work_without_a_node(data_dir):
    created = run_cli("admin", "api-key", "create", data_dir=data_dir)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert len(key) == 32 and key.isalnum()
    path = data_dir / vmqapi.KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    shown = run_cli("admin", "api-key", "show", data_dir=data_dir)
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[1] == "|              Key               |Scope|Expires (UTC)|has expired|"
    assert f"|{key}|mgmt |never        |false      |" in shown.stdout
    again = run_cli("admin", "api-key", "add", f"key={key}", data_dir=data_dir)
    assert again.returncode == 1 and again.stderr.strip() == "key_already_exists"
    gone = run_cli("admin", "api-key", "delete", f"key={key}", data_dir=data_dir)
    assert gone.returncode == 0 and gone.stdout.strip() == "ok"
    as_json = run_cli("admin", "api-key", "show", "--format=json", data_dir=data_dir)
    assert as_json.stdout == '{"table":[],"type":"table"}'


def test_usage_errors_exit_2(data_dir):
    cases = (["admin", "no", "such"], ["admin", "api-key", "add"], ["admin", "api-key", "show", "bogus=1"],
             ["admin"], ["frobnicate"])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # independent children: both cores
        results = list(pool.map(lambda args: run_cli(*args, data_dir=data_dir), cases))
    for args, result in zip(cases, results):
        assert result.returncode == 2, args
        assert result.stderr.strip()
    assert "vmq-admin api-key add key=<key>" in results[1].stderr  # the usage of the command missing an argument


def test_help_is_generated_from_the_table(data_dir):
    result = run_cli("admin", "--help", data_dir=data_dir)
    assert result.returncode == 0
    for cmd in vmqapi.CATALOGUE:
        assert cmd.synopsis() in result.stdout
    one = run_cli("admin", "session", "disconnect", "--help", data_dir=data_dir)
    assert one.returncode == 0 and one.stdout.startswith("vmq-admin session disconnect client-id=<client-id>")


def test_no_node_running(data_dir):
    result = run_cli("admin", "cluster", "show", data_dir=data_dir)
    assert result.returncode == 1 and "no node is running" in result.stderr


def test_stale_node_file(data_dir):
    data_dir.mkdir()
    (data_dir / vmqapi.NODE_FILE).write_text(json.dumps(
        {"node": "x", "pid": 999999, "secret": "s", "listeners": [{"type": "http", "address": "127.0.0.1",
                                                                    "port": 9}]}))
    result = run_cli("admin", "cluster", "show", data_dir=data_dir)
    assert result.returncode == 1 and "nothing answers" in result.stderr


def test_teaching_mode_prints_the_request(data_dir):
    result = run_cli("admin", "session", "disconnect", "client-id=a b", "--cleanup", "--http", data_dir=data_dir)
    assert result.returncode == 0
    get, curl = result.stdout.splitlines()
    assert get == "GET /api/v1/session/disconnect?client-id=a+b&--cleanup"
    assert curl == 'curl -u "$KEY:" "http://127.0.0.1:8888/api/v1/session/disconnect?client-id=a+b&--cleanup"'


# -- against a live node --------------------------------------------------------------

def test_commands_run_in_the_live_node(make_node):
    node = make_node()
    data_dir = Path(node.data_dir)
    key = node.keystore.create()
    human = run_cli("admin", "listener", "show", data_dir=data_dir)
    assert human.returncode == 0 and "|http|running|127.0.0.1|" in human.stdout
    as_json = run_cli("admin", "cluster", "show", "--format=json", data_dir=data_dir)
    client = Client(node)
    try:
        assert as_json.stdout == client.get("/api/v1/cluster/show", key=key)[2].decode()
    finally:
        client.close()
    alert = run_cli("admin", "cluster", "join", "discovery-node=a@b", data_dir=data_dir)
    assert alert.returncode == 1 and "cannot join a@b: unreachable" in alert.stderr
    bad = run_cli("admin", "set", "max_client_id_size=huge", data_dir=data_dir)
    assert bad.returncode == 2 and "max_client_id_size" in bad.stderr
    ok = run_cli("admin", "set", "max_client_id_size=50", data_dir=data_dir)
    assert ok.returncode == 0 and node.config["max_client_id_size"] == 50
    shown = run_cli("admin", "show", "max_client_id_size", "--format=json", data_dir=data_dir)
    assert json.loads(shown.stdout)["table"][0]["max_client_id_size"] == 50


def test_embedder_commands_reach_the_cli(make_node):
    node = make_node()
    node.commands.register(("gateway", "show"), lambda call: "gateway up", usage="Show the gateway.",
                           read_only=True)
    result = run_cli("admin", "gateway", "show", data_dir=Path(node.data_dir))
    assert result.returncode == 0 and result.stdout == "gateway up\n"


def test_key_added_by_cli_works_at_once_and_deleted_fails_at_once(make_node):
    node = make_node()
    data_dir = Path(node.data_dir)
    client = Client(node)
    try:
        assert run_cli("admin", "api-key", "add", "key=clikey12345", data_dir=data_dir).returncode == 0
        assert client.get("/api/v1/cluster/show", key="clikey12345")[0] == 200
        assert run_cli("admin", "api-key", "delete", "key=clikey12345", data_dir=data_dir).returncode == 0
        assert client.get("/api/v1/cluster/show", key="clikey12345")[0] == 401
    finally:
        client.close()


# -- node processes --------------------------------------------------------------------

def start_node_process(data_dir, *extra, env=None):
    cmd = vmqapi_command("--data-dir", str(data_dir), "--set", "listener.http.default=127.0.0.1:0",
                         "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.vmq.clustering=127.0.0.1:0",
                         *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=vmqapi_env(**(env or {})))


def wait_for_node_file(data_dir, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = vmqapi.read_node_file(str(data_dir))
        if info and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            raise AssertionError(f"node exited: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("node.json never appeared")


def stop_process(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=20)


def test_node_process_sigterm(data_dir):
    proc = start_node_process(data_dir)
    try:
        info = wait_for_node_file(data_dir, proc)
        assert info["pid"] == proc.pid and info["listeners"][0]["port"] > 0
        assert stat.S_IMODE(os.stat(data_dir / vmqapi.NODE_FILE).st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert f"http listener on 127.0.0.1:{info['listeners'][0]['port']}" in out
        assert not (data_dir / vmqapi.NODE_FILE).exists()
    finally:
        stop_process(proc)


def test_node_stop_via_cli(data_dir):
    proc = start_node_process(data_dir)
    try:
        wait_for_node_file(data_dir, proc)
        result = run_cli("admin", "node", "stop", data_dir=data_dir)
        assert result.returncode == 0 and result.stdout == "Done\n"
        proc.wait(20)
        assert proc.returncode == 0
    finally:
        stop_process(proc)


def test_provisioned_keys_work_and_are_never_printed(data_dir, tmp_path):
    boot = tmp_path / "boot.txt"
    boot.write_text("# bootstrap\nbootkey-from-file1:mgmt\n")
    env = {"VMQAPI_API_KEYS": "envkey-number-one,envkey-status-two:status"}
    proc = start_node_process(data_dir, "--set", f"api_key_bootstrap_file={boot}", env=env)
    try:
        info = wait_for_node_file(data_dir, proc)
        node_port = info["listeners"][0]["port"]
        import http.client
        for key, status in (("envkey-number-one", 200), ("bootkey-from-file1", 200), ("envkey-status-two", 401)):
            conn = http.client.HTTPConnection("127.0.0.1", node_port, timeout=10)
            conn.request("GET", "/api/v1/cluster/show", headers={"Authorization": basic(key)})
            assert conn.getresponse().status == status
            conn.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        for secret in ("envkey-number-one", "envkey-status-two", "bootkey-from-file1"):
            assert secret not in out and secret not in err
    finally:
        stop_process(proc)
    again = start_node_process(data_dir, "--set", f"api_key_bootstrap_file={boot}", env=env)
    try:
        wait_for_node_file(data_dir, again)  # idempotent: starts again with the same keys
        assert len(vmqapi.KeyStore(str(data_dir / vmqapi.KEY_FILE)).entries()) == 3
    finally:
        stop_process(again)


def test_corrupt_key_file_stops_the_node(data_dir):
    data_dir.mkdir()
    path = data_dir / vmqapi.KEY_FILE
    path.write_bytes(b'{"keys": [oops')
    proc = start_node_process(data_dir)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "corrupt" in err and str(path) in err
    assert path.read_bytes() == b'{"keys": [oops'
    assert not (data_dir / vmqapi.NODE_FILE).exists()


def test_bad_config_file_names_file_and_line(data_dir, tmp_path):
    conf = tmp_path / "vernemq.conf"
    conf.write_text("# comment\nnodename = a@b\n\nno_such_key = 1\n")
    result = run_cli("--config", str(conf), data_dir=data_dir)
    assert result.returncode == 2 and f"{conf}:4: unknown configuration key 'no_such_key'" in result.stderr


def test_second_node_on_the_same_data_dir_is_refused(data_dir):
    proc = start_node_process(data_dir)
    try:
        wait_for_node_file(data_dir, proc)
        second = start_node_process(data_dir)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 1 and "another node" in err
    finally:
        stop_process(proc)


def test_secret_files_readable_by_others_are_refused(data_dir, tmp_path):
    import os
    keys = run_cli("admin", "api-key", "create", data_dir=data_dir)
    assert keys.returncode == 0
    path = data_dir / vmqapi.KEY_FILE
    os.chmod(path, 0o644)
    proc = start_node_process(data_dir)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and f"run: chmod 600 {path}" in err
    os.chmod(path, 0o600)
    passwd = tmp_path / "vmq.passwd"
    passwd.write_text("u:" + vmqapi.hash_password("p") + "\n")
    os.chmod(passwd, 0o640)
    proc = start_node_process(data_dir, "--set", f"vmq_passwd.password_file={passwd}")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and f"run: chmod 600 {passwd}" in err


# -- a light start: python vmqapi.py runs from the cached bytecode -----------------------

def idle_node_rss(folder, data_dir, argv, env):
    """Start a node with ``argv`` in ``folder``; return its VmRSS in MB once listening and idle."""
    cmd = [*argv, "--data-dir", str(data_dir), "--set", "listener.http.default=127.0.0.1:0",
           "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.vmq.clustering=127.0.0.1:0"]
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_node_file(data_dir, proc)  # same pid: the hand-over keeps it
        time.sleep(0.5)
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
        assert proc.returncode == 0 and not (data_dir / vmqapi.NODE_FILE).exists()
        return rss
    finally:
        stop_process(proc)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("keep_pyc", [True, False, "written", "stale"])
def test_script_start_costs_no_more_than_an_import(tmp_path, keep_pyc):
    # Compiling the module as __main__ used to leave ~18 MB in the node (46 MB idle against 28 MB
    # for a node started by ``import vmqapi``). A copy keeps the .pyc out of the source tree.
    # "written": the first start after the file changed compiles it and writes the .pyc (that
    # start kept the compiler's memory, 72 MB idle, until the check looked at when it was written);
    # "stale": the file changed and its old .pyc cannot be written again (so every start compiles).
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "vmqapi.py").write_bytes(Path(ROOT, "vmqapi.py").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    imported = [sys.executable, "-c", "import sys, vmqapi; sys.argv[0] = 'vmqapi'; sys.exit(vmqapi.main())"]
    idle_node_rss(folder, tmp_path / "a0", imported, env)  # writes the .pyc (and keeps what compiling cost)
    baseline = idle_node_rss(folder, tmp_path / "a", imported, env)  # uses it: the import's own cost
    assert (folder / "__pycache__").is_dir()
    if keep_pyc == "stale":
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        with open(folder / "vmqapi.py", "a") as fh:
            fh.write("# changed\n")
    elif keep_pyc is not True:
        if not keep_pyc:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        for pyc in (folder / "__pycache__").iterdir():
            pyc.unlink()
    script = idle_node_rss(folder, tmp_path / "b", [sys.executable, "vmqapi.py"], env)
    # compiled in the node (no .pyc, or written now): the compiler's 40 MB given back, a few MB stay;
    # from the .pyc, the node has not loaded OpenSSL (about 4.5 MB), which an import of vmqapi does
    assert script < baseline + (-2 if keep_pyc is True else 8), (script, baseline)
    assert sorted(p.name for p in folder.iterdir()) == ["__pycache__", "vmqapi.py"]
    assert len(list((folder / "__pycache__").iterdir())) == (1 if keep_pyc else 0)
    if keep_pyc == "stale":  # and it is still the old file's
        assert idle_node_rss(folder, tmp_path / "c", [sys.executable, "vmqapi.py"], env) < baseline + 8


@pytest.mark.parametrize("own_hashes", [True, False])
def test_a_script_node_holds_openssl_back_only_where_python_has_its_own_hashes(tmp_path, own_hashes):
    # Run the file as the hand-over's interpreter does. Without _md5, _sha1... (a FIPS build) hashlib
    # and random need OpenSSL's hashes, so the node must import it at once, as before.
    missing = "" if own_hashes else "".join(f"sys.modules[{n!r}] = None\n" for n in (
        "_md5", "_sha1", "_sha2", "_sha256", "_sha512", "_sha3"))
    stub = (f"import atexit, sys, importlib.util as u\n{missing}"
            f"sys.argv = [{os.path.join(ROOT, 'vmqapi.py')!r}, '--version']\n"
            "s = u.spec_from_file_location('__main__', sys.argv[0]); m = u.module_from_spec(s)\n"
            "atexit.register(lambda: print(m._SSL_LATER, 'ssl' in sys.modules, "
            "sys.modules['hashlib'].sha256(b'x').hexdigest()[:8]))\n"
            "sys.modules['__main__'] = m; s.loader.exec_module(m)\n")
    result = subprocess.run([sys.executable, "-S", "-c", stub], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path))
    assert result.returncode == 0 and not result.stderr, result.stderr
    version, later, loaded, digest = result.stdout.rsplit(maxsplit=3)
    assert version.startswith("vmqapi ")
    assert (later, loaded) == (("True", "False") if own_hashes else ("False", "True"))
    assert digest == "2d711642"  # sha256(b"x"), by Python's own code or by OpenSSL's


def test_script_start_keeps_exit_codes_and_stdin(tmp_path):
    cmd = [sys.executable, "-X", "utf8", os.path.join(ROOT, "vmqapi.py")]
    passwd = subprocess.run([*cmd, "passwd", "-c", str(tmp_path / "pw"), "alice"], input="s3cret\n",
                            capture_output=True, text=True, timeout=60)
    assert passwd.returncode == 0 and (tmp_path / "pw").read_text().startswith("alice:$6$")
    again = subprocess.run([*cmd, "passwd", "-c", str(tmp_path / "pw"), "alice"], input="x\n",
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    usage = subprocess.run([*cmd, "--data-dir", str(tmp_path / "d"), "admin", "no-such", "words"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "unknown command 'no-such words'" in usage.stderr
    flags = subprocess.run([*cmd, "admin", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert flags.returncode == 0 and "session show" in flags.stdout


# -- Ctrl-C at any moment, and the name ps shows -----------------------------------------

SIGINT_DELAYS = (0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, "ready")  # s after the script's first lines run


def script_copy(tmp_path, cached):
    """A copy of vmqapi.py (its bytecode cached beside it, or none can be kept) and the env to start it with."""
    import py_compile
    from importlib.util import cache_from_source
    folder = tmp_path / "app"
    folder.mkdir()
    script = folder / "vmqapi.py"
    script.write_bytes(Path(ROOT, "vmqapi.py").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if cached:
        py_compile.compile(str(script), cfile=cache_from_source(str(script)), doraise=True)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the new interpreter compiles the file again, as the user saw
    return script, env


def start_script(script, data_dir, env):
    from capped import child_setup
    cmd = [sys.executable, str(script), "--data-dir", str(data_dir), "--set", "listener.http.default=127.0.0.1:0",
           "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.vmq.clustering=127.0.0.1:0"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=child_setup())  # SIGINT as a terminal delivers it, not the runner's


def wait_until_serving(proc, data_dir):
    """Wait for node.json and then for the first line the node prints once it serves."""
    import select
    wait_for_node_file(data_dir, proc)
    assert select.select([proc.stdout], [], [], 20)[0], "no listener line"
    line = proc.stdout.readline()
    assert " listener on " in line, line
    return line


def past_the_first_lines(pid):
    """Whether the script has run its first lines: SIGINT blocked for the exec, or the new interpreter's argv.

    Before them Python itself starts and compiles the 15,000-line file: a Ctrl-C then is
    Python's to report, beyond the reach of anything the file says.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            blocked = next(int(line.split()[1], 16) for line in fh if line.startswith("SigBlk:"))
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except (OSError, StopIteration):
        return True  # gone already: its output says why
    return bool(blocked & 1 << (signal.SIGINT - 1)) or b"\0-c\0" in cmdline or cmdline.endswith(b"\0\0")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("cached", [True, False], ids=["bytecode", "source"])
@pytest.mark.parametrize("delay", SIGINT_DELAYS)
def test_ctrl_c_at_any_moment_of_start_up_run_and_stop_leaves_no_traceback(tmp_path, cached, delay):
    # The hand-over's stub and the imports after it used to end in a KeyboardInterrupt traceback
    # (in source_to_code, in import asyncio) and exit -2. Now: 130 if the node had not started
    # serving (the shell's code for a command Ctrl-C stopped), 0 once it had (a clean stop).
    script, env = script_copy(tmp_path, cached)
    data_dir = tmp_path / "data"
    proc = start_script(script, data_dir, env)
    try:
        deadline = time.monotonic() + 20
        while not past_the_first_lines(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.0005)
        first = wait_until_serving(proc, data_dir) if delay == "ready" else ""
        time.sleep(0 if first else delay)
        proc.send_signal(signal.SIGINT)
        if first:  # and once more while it stops
            time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        out = first + out
    finally:
        stop_process(proc)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    served = " listener on " in out
    assert proc.returncode == (0 if served else 130), (proc.returncode, out, err)
    assert served or delay != "ready"
    assert not (data_dir / vmqapi.NODE_FILE).exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
@pytest.mark.parametrize("cached", [True, False], ids=["bytecode", "source"])
def test_ps_shows_the_node_as_the_script_it_was_started_as(tmp_path, cached):
    # After the hand-over ps showed "python -c import importlib.util as u,..." first.
    script, env = script_copy(tmp_path, cached)
    data_dir = tmp_path / "data"
    proc = start_script(script, data_dir, env)
    try:
        wait_until_serving(proc, data_dir)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            shown = [os.fsdecode(arg) for arg in fh.read().rstrip(b"\0").split(b"\0")]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert shown == [sys.executable, str(script), *proc.args[2:]]
    assert proc.returncode == 0


def test_the_interpreter_a_script_hands_over_to_runs_nothing_installed_beside_python(tmp_path):
    # Python's `site` runs sitecustomize and every .pth file of site-packages at each start (code
    # of whatever is installed there; here it cost the node 0.7 MB and imports it never used).
    # The new interpreter starts with -S: only the first one, which hands over, still runs it.
    script, env = script_copy(tmp_path, cached=True)
    hooks, log = tmp_path / "hooks", tmp_path / "site-ran.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(f"import sys\nwith open({str(log)!r}, 'a') as fh:\n"
                                           "    fh.write(repr(sys.orig_argv) + '\\n')\n")
    env["PYTHONPATH"] = str(hooks)
    subprocess.run([sys.executable, "-c", "pass"], env=env, timeout=60, check=True)
    if not log.exists():
        pytest.skip("this Python does not run sitecustomize at start")
    log.unlink()
    data_dir = tmp_path / "data"
    proc = start_script(script, data_dir, env)
    try:
        wait_until_serving(proc, data_dir)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    runs = [ast.literal_eval(line) for line in log.read_text().splitlines()]
    assert runs == [[sys.executable, str(script), *proc.args[2:]]]  # the first interpreter, not the node's


# -- what a newcomer trips on ------------------------------------------------------------

def test_vmq_admin_console_script_help_lists_the_commands(tmp_path):
    # The console script calls admin_main(); run it as pip's wrapper does.
    script = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'vmq-admin'; "
              "import vmqapi; vmqapi.admin_main()")
    for args in (["--help"], ["--data-dir", str(tmp_path / "d"), "--help"]):
        result = subprocess.run([sys.executable, "-c", script, ROOT, *args], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "vmq-admin session show" in result.stdout and "--config" not in result.stdout
    version = subprocess.run([sys.executable, "-c", script, ROOT, "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"vmqapi {vmqapi.__version__}\n")


def test_data_dir_from_the_environment_and_a_word_about_a_new_key_file(make_node, tmp_path):
    node = make_node()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ)
    env.pop("VMQAPI_DATA_DIR", None)
    cli = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "admin"]
    with_env = subprocess.run([*cli, "api-key", "create"], capture_output=True, text=True, timeout=60,
                              cwd=elsewhere, env=dict(env, VMQAPI_DATA_DIR=node.data_dir))
    assert with_env.returncode == 0 and with_env.stderr == ""
    key = with_env.stdout.strip()
    http = Client(node)
    try:
        assert http.get("/api/v1/cluster/show", key=key)[0] == 200  # the running node's key file
    finally:
        http.close()
    shown = subprocess.run([*cli, "session", "show"], capture_output=True, text=True, timeout=60,
                           cwd=elsewhere, env=dict(env, VMQAPI_DATA_DIR=node.data_dir))
    assert shown.returncode == 0, shown.stderr
    lost = subprocess.run([*cli, "api-key", "create"], capture_output=True, text=True, timeout=60, cwd=elsewhere,
                          env=env)
    assert lost.returncode == 0 and len(lost.stdout.strip()) == 32
    warning = lost.stderr.strip()
    assert "\n" not in warning and str(elsewhere / "vmqapi-data") in warning and "no node runs" in warning
    assert "--data-dir" in warning and "VMQAPI_DATA_DIR" in warning
    second = subprocess.run([*cli, "api-key", "create"], capture_output=True, text=True, timeout=60,
                            cwd=elsewhere, env=env)
    assert second.returncode == 0 and second.stderr == ""  # said once, when the file is made
    flag_wins = subprocess.run([sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", node.data_dir,
                                "admin", "cluster", "show"], capture_output=True, text=True, timeout=60,
                               cwd=elsewhere, env=dict(env, VMQAPI_DATA_DIR=str(tmp_path / "nothing")))
    assert flag_wins.returncode == 0 and "true" in flag_wins.stdout


def test_a_word_where_an_argument_belongs_gets_the_http_message(make_node):
    node = make_node()
    expected = "argument 'client-id' has no value (write client-id=<value>)"
    http = Client(node)
    try:
        status, _, body = http.get("/api/v1/session/disconnect?client-id", key=node.keystore.create())
    finally:
        http.close()
    assert status == 400 and json.loads(body)["text"] == expected
    for data_dir in (Path(node.data_dir), Path(node.data_dir).parent / "no-node"):
        result = run_cli("admin", "session", "disconnect", "client-id", data_dir=data_dir)
        assert result.returncode == 2 and result.stderr.strip() == f"vmq-admin: {expected}"


def test_group_help_lists_its_commands_and_version_is_a_version(data_dir):
    result = run_cli("admin", "session", "--help", data_dir=data_dir)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines == [c.synopsis() for c in vmqapi.CommandTable(vmqapi.CATALOGUE) if c.words[0] == "session"]
    nested = run_cli("admin", "session", "disconnect", "--help", data_dir=data_dir)
    assert nested.stdout.startswith("vmq-admin session disconnect client-id=<client-id>")  # a command: its usage
    version = run_cli("admin", "--version", data_dir=data_dir)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"vmqapi {vmqapi.__version__}\n", "")


def test_node_help_mentions_passwd_and_the_admin_flags(data_dir):
    result = run_cli("--help", data_dir=data_dir)
    assert result.returncode == 0
    for word in ("passwd", "admin <words>", "--format=json", "--http", "VMQAPI_DATA_DIR"):
        assert word in result.stdout, word


def test_empty_tables_print_their_header_box(make_node):
    node = make_node()
    data_dir = Path(node.data_dir)
    sessions = run_cli("admin", "session", "show", data_dir=data_dir)
    assert sessions.returncode == 0, sessions.stderr
    rule, header, rule2, rule3 = sessions.stdout.splitlines()
    assert rule == rule2 == rule3 and rule.startswith("+-") and "client_id" in header and "is_online" in header
    keys = run_cli("admin", "api-key", "show", data_dir=data_dir)
    assert len(keys.stdout.splitlines()) == 4 and "|Key|" in keys.stdout  # the same shape, local
    as_json = run_cli("admin", "session", "show", "--format=json", data_dir=data_dir)
    assert as_json.stdout == '{"table":[],"type":"table"}'  # the HTTP body, unchanged


# -- the node reads only regular files of bounded size ---------------------------------------------

def start_refused(data_dir, *extra, cwd=None):
    """Start a node under a 1 GiB address-space cap; return (exit code, stderr) within 15 s (killed past it)."""
    from capped import child_setup
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(data_dir),
           "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.tcp.default=127.0.0.1:0",
           "--set", "listener.vmq.clustering=127.0.0.1:0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=child_setup(cap=1 << 30))
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=20)
        raise AssertionError("the node hung reading the file") from None
    return proc.returncode, err


def fifo(path):
    os.mkfifo(path, 0o600)
    return path


def zero(path):
    os.symlink("/dev/zero", path)
    return path


def huge(path):
    with open(path, "wb") as fh:
        fh.truncate((64 << 20) + 1)  # sparse: larger than any bound, costs no disk
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("make", [fifo, zero, huge], ids=["fifo", "dev-zero", "too-large"])
def test_a_key_file_that_is_no_regular_file_stops_the_start_with_one_line(data_dir, make):
    """README (files): api_keys.json as a FIFO held the start forever, silently; as /dev/zero it was read
    until MemoryError. Now one line naming the file, exit 2, and the file is left as it was."""
    data_dir.mkdir(mode=0o700)
    path = make(str(data_dir / vmqapi.KEY_FILE))
    before = os.lstat(path)
    code, err = start_refused(data_dir)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and ("regular file" in lines[0] or "larger than" in lines[0]), err
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino, after.st_size) == (before.st_mode, before.st_ino, before.st_size)


@pytest.mark.parametrize("which", ["config", "passwd", "acl", "store", "cluster", "certfile"])
@pytest.mark.parametrize("make", [fifo, zero], ids=["fifo", "dev-zero"])
def test_every_file_the_node_reads_must_be_regular(data_dir, tmp_path, which, make):
    data_dir.mkdir(mode=0o700)
    extra = []
    if which == "config":
        extra = ["--config", make(str(tmp_path / "vernemq.conf"))]
    elif which == "passwd":
        extra = ["--set", f"vmq_passwd.password_file={make(str(tmp_path / 'passwd'))}"]
    elif which == "acl":
        extra = ["--set", f"vmq_acl.acl_file={make(str(tmp_path / 'acl'))}"]
    elif which == "store":
        make(str(data_dir / "messages.db"))
    elif which == "certfile":  # OpenSSL would wait on a FIFO for ever
        extra = ["--set", "listener.ssl.default=127.0.0.1:0",
                 "--set", f"listener.ssl.certfile={make(str(tmp_path / 'cert.pem'))}"]
    else:
        make(str(data_dir / "cluster.db"))
    code, err = start_refused(data_dir, *extra)
    assert code == 2 and "not a regular file" in err, err


def test_a_node_json_that_is_a_fifo_counts_as_none(tmp_path):
    fifo(str(tmp_path / vmqapi.NODE_FILE))
    started = time.monotonic()
    assert vmqapi.read_node_file(str(tmp_path)) is None
    assert time.monotonic() - started < 1


def test_an_open_data_dir_is_made_0700(data_dir):
    """README (files): a data dir that existed with mode 0777 stayed 0777. The node makes it 0700 (it owns
    it) and says so once."""
    data_dir.mkdir()
    os.chmod(data_dir, 0o777)
    proc = start_node_process(data_dir)
    try:
        wait_for_node_file(data_dir, proc)
        assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=20)
    assert "was mode 777; vmqapi made it 0700" in err


def terminated_stderr(proc):
    """Stop a node process with SIGTERM (it logs to the end) and return its stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=20)[1]


def test_a_bad_value_is_quoted_without_its_spacing(data_dir, tmp_path):
    """A config file line ``key = value`` quoted the value with the space after '='."""
    conf = tmp_path / "vernemq.conf"
    conf.write_text("max_client_id_size = ten\n")
    code, err = start_refused(data_dir, "--config", str(conf))
    assert code == 2 and "bad value for max_client_id_size: expected an integer, got 'ten'" in err, err


def test_the_allow_anonymous_warning_waits_for_a_start_that_succeeds(data_dir):
    """An address in use stops the start: the warning about anonymous clients would speak of a node that never ran."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = start_refused(data_dir, "--set", f"listener.tcp.default=127.0.0.1:{busy.getsockname()[1]}")
    assert code != 0 and "cannot start" in err, err
    assert "allow_anonymous" not in err, err
    proc = start_node_process(data_dir)
    try:
        wait_for_node_file(data_dir, proc)
    finally:
        err = terminated_stderr(proc)
    assert "allow_anonymous is not set" in err, "the warning is still given once the node runs"


def test_a_missing_bridge_cafile_is_bad_configuration(data_dir, tmp_path):
    """README, "The command line": bad configuration exits 2, with one line naming the file."""
    missing = str(tmp_path / "no-such-ca.pem")
    code, err = start_refused(data_dir, "--set", "plugins.vmq_bridge=on", "--set", "vmq_bridge.ssl.br0=127.0.0.1:1",
                              "--set", "vmq_bridge.ssl.br0.topic.1=a out", "--set", f"vmq_bridge.ssl.br0.cafile={missing}")
    lines = [x for x in err.splitlines() if x.startswith("vmqapi:")]
    assert code == 2 and len(lines) == 1 and missing in lines[0], err
    assert "Traceback" not in err


def test_the_descriptor_warning_says_what_to_do(data_dir):
    """With a WebSocket listener the listeners' max_connections together pass a low descriptor limit."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(data_dir),
           "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.tcp.default=127.0.0.1:0",
           "--set", "listener.vmq.clustering=127.0.0.1:0", "--set", "listener.ws.default=127.0.0.1:0",
           "--set", "listener.tcp.default.max_connections=1000", "--set", "listener.ws.default.max_connections=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=low_limit)
    try:
        wait_for_node_file(data_dir, proc)
    finally:
        err = terminated_stderr(proc)
    assert "below the listeners' max_connections (3000 together)" in err, err
    assert "ulimit -n 3128" in err and "lower listener.<type>.<name>.max_connections" in err, err


def test_session_show_queue_size_counts_the_queued_messages(make_node):
    """queue_size was always null, even with messages queued for an offline and an online session."""
    from test_broker import client_maker
    node = make_node(max_inflight_messages="1")
    with client_maker(node) as connect:
        away = connect("away", clean=False)
        away.subscribe(("q", 1))
        away.disconnect()
        slow = connect("slow", clean=False)
        slow.subscribe(("q", 1))
        pub = connect("pub")
        for n in range(3):
            pub.publish("q", b"%d" % n, 1)
        slow.message(ack=False)  # holds the in-flight window of one: the two others wait in its queue
        shown = run_cli("admin", "session", "show", "--client_id", "--queue_size", "--offline_messages",
                        "--online_messages", "--format=json", data_dir=Path(node.data_dir))
    assert shown.returncode == 0, shown.stderr
    rows = {r["client_id"]: r for r in json.loads(shown.stdout)["table"]}
    assert rows["away"]["queue_size"] == rows["away"]["offline_messages"] == 3, rows
    assert rows["slow"]["queue_size"] == rows["slow"]["online_messages"] == 2, rows
    assert rows["pub"]["queue_size"] == 0, rows


@pytest.mark.parametrize("where", ["under_a_file", "in_proc", "in_a_parent_not_writable"])
def test_a_data_dir_that_cannot_be_created_is_one_line_and_exit_2(tmp_path, where):
    """A file on the way, /proc, a parent the user cannot write: the node and api-key create gave a traceback."""
    if where == "under_a_file":
        (tmp_path / "afile").write_text("")
        folder = tmp_path / "afile" / "sub"
    elif where == "in_proc":
        folder = Path("/proc/vmqapi-data")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into any directory")
        (tmp_path / "ro").mkdir(mode=0o500)
        folder = tmp_path / "ro" / "data"
    code, err = start_refused(folder)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"vmqapi: cannot create the data dir {folder}: "), err
    created = subprocess.run([sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(folder),
                              "admin", "api-key", "create"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert created.returncode == 2 and "Traceback" not in created.stderr, created.stderr
    assert len(created.stderr.splitlines()) == 1 and str(folder) in created.stderr, created.stderr
    assert not folder.exists()


def test_global_options_after_admin_work_as_vmq_admin_takes_them(make_node):
    """admin --data-dir D cluster show said "unexpected word", admin cluster show --data-dir=D "takes no flag"."""
    node = make_node()
    folder = Path(node.data_dir)
    script = os.path.join(ROOT, "vmqapi.py")
    for argv in (["admin", "--data-dir", str(folder), "cluster", "show"],
                 ["admin", "cluster", "show", f"--data-dir={folder}"],
                 ["admin", "cluster", "show", "--data-dir", str(folder), "--format=json"]):
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=60,
                              cwd=folder.parent)
        assert done.returncode == 0 and node.name in done.stdout, (argv, done.stderr)


# -- a node whose start is under way (the README's cluster lines, pasted) --------------

def dead_pid():
    """Return the pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(20)
    return proc.pid


def test_a_stale_start_marker_is_ignored_and_removed(data_dir):
    """A start killed half-way leaves starting.pid naming a dead process: no wait, and it is removed."""
    data_dir.mkdir(mode=0o700)
    marker = data_dir / vmqapi.START_FILE
    marker.write_text(f"{dead_pid()}\n")
    started = time.monotonic()
    result = run_cli("admin", "cluster", "show", data_dir=data_dir)
    assert result.returncode == 1 and "no node is running" in result.stderr, result.stderr
    assert "waiting" not in result.stderr and time.monotonic() - started < vmqapi.NODE_START_WAIT
    assert not marker.exists()
    fifo(str(marker))  # not a regular file: never read, never removed, no start under way
    assert vmqapi.starting_pid(str(data_dir)) is None and stat.S_ISFIFO(os.lstat(marker).st_mode)
    for garbled in (b"", b"not a pid", b"-1", b"9" * 40, b"1" * 100):  # none a live process's pid
        marker.unlink(missing_ok=True)
        marker.write_bytes(garbled)
        assert vmqapi.starting_pid(str(data_dir)) is None


def test_a_command_waits_for_a_node_whose_start_is_under_way(data_dir, capsys, monkeypatch):
    data_dir.mkdir(mode=0o700)
    vmqapi.mark_start(str(data_dir))  # this process: alive
    assert stat.S_IMODE(os.stat(data_dir / vmqapi.START_FILE).st_mode) == 0o600
    monkeypatch.setattr(vmqapi, "NODE_START_WAIT", 0.5)
    started = time.monotonic()
    with pytest.raises(vmqapi.NodeNotRunning, match="has not finished its start within 0.5 s"):
        vmqapi.find_node(str(data_dir))
    assert 0.5 <= time.monotonic() - started < 3
    assert capsys.readouterr().err.count(f"waiting for the node on {data_dir} to start") == 1
    monkeypatch.setattr(vmqapi, "NODE_START_WAIT", 10.0)
    info = {"node": "n", "pid": os.getpid(), "secret": "s", "listeners": []}
    writer = threading.Timer(0.3, lambda: vmqapi.write_file_atomically(str(data_dir / vmqapi.NODE_FILE),
                                                                       json.dumps(info).encode()))
    writer.start()
    try:
        assert vmqapi.find_node(str(data_dir)) == info
    finally:
        writer.join()
    assert "waiting for the node" in capsys.readouterr().err


def test_the_start_marker_lives_while_the_node_starts(make_node, tmp_path, monkeypatch):
    seen = []
    real = vmqapi.Node._start

    def look(node):
        seen.append(vmqapi.starting_pid(node.data_dir))
        real(node)
    monkeypatch.setattr(vmqapi.Node, "_start", look)
    node = make_node()
    assert seen == [os.getpid()] and not os.path.exists(os.path.join(node.data_dir, vmqapi.START_FILE))
    taken = node.listeners()[0]
    failing = vmqapi.Node({"data_dir": str(tmp_path / "other"),
                           "listener.http.default": f"{taken['address']}:{taken['port']}",
                           "listener.tcp.default": "127.0.0.1:0", "listener.vmq.clustering": "127.0.0.1:0"})
    with pytest.raises(vmqapi.ConfigError):
        failing.start()
    assert seen[-1] == os.getpid() and not (tmp_path / "other" / vmqapi.START_FILE).exists()


def test_a_signal_sent_once_node_json_is_out_stops_a_node_that_served(tmp_path, monkeypatch, capsys):
    # Whoever waits for node.json may signal at once, before start() has returned to run_node: that is
    # a node that served (exit 0, its listener lines printed), not one stopped during its start (143).
    from conftest import node_config
    write = vmqapi.write_file_atomically

    def write_then_signal(path, data, *args, **kwargs):  # the signal comes as soon as the file can be seen
        result = write(path, data, *args, **kwargs)
        if os.path.basename(path) == vmqapi.NODE_FILE:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(vmqapi, "write_file_atomically", write_then_signal)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interval = sys.getswitchinterval()
    try:
        assert vmqapi.run_node(vmqapi.Config(node_config(tmp_path / "d"))) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sys.setswitchinterval(interval)
    assert "http listener on 127.0.0.1:" in capsys.readouterr().out


def test_a_node_stop_asked_while_the_node_starts_stops_it_once_it_is_whole(tmp_path, monkeypatch):
    # node stop through the API can come before start() is done (the HTTP listener is up before
    # node.json is written): it used to stop only the HTTP listeners and leave the node running.
    from conftest import node_config
    write = vmqapi.write_file_atomically
    node = vmqapi.Node(node_config(tmp_path / "d"))

    def write_then_stop(path, data, *args, **kwargs):
        result = write(path, data, *args, **kwargs)
        if os.path.basename(path) == vmqapi.NODE_FILE:
            node.request_stop()
        return result

    monkeypatch.setattr(vmqapi, "write_file_atomically", write_then_stop)
    try:
        node.start()
        assert node.wait(20), "the node kept running"
        assert not (tmp_path / "d" / vmqapi.NODE_FILE).exists()
    finally:
        node.stop()


def test_stop_called_by_another_thread_while_the_node_starts_waits_and_stops_it_whole(tmp_path, monkeypatch):
    # An embedding program may call stop() while start() runs in another thread: it used to see a node not
    # yet running, close the HTTP listeners and return, and start() then left MQTT serving.
    from conftest import node_config
    write = vmqapi.write_file_atomically
    node = vmqapi.Node(node_config(tmp_path / "d"))
    stopper = threading.Thread(target=node.stop)
    ports = []

    def write_while_stopping(path, data, *args, **kwargs):
        if os.path.basename(path) == vmqapi.NODE_FILE:
            ports.extend(x["port"] for x in json.loads(data)["listeners"])
            stopper.start()
            deadline = time.monotonic() + 10
            while not node._stop_asked and time.monotonic() < deadline:  # stop() is waiting for this start
                time.sleep(0.01)
            assert stopper.is_alive(), "stop() returned while the node was starting"
        return write(path, data, *args, **kwargs)

    monkeypatch.setattr(vmqapi, "write_file_atomically", write_while_stopping)
    try:
        node.start()
        stopper.join(20)
        assert not stopper.is_alive()
        assert node.wait(0), "the node kept running"
        assert not (tmp_path / "d" / vmqapi.NODE_FILE).exists()
        for port in ports:  # MQTT's and HTTP's
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        node.stop()


def test_a_node_that_cannot_start_its_status_thread_stops_whole_and_says_why(tmp_path, monkeypatch):
    from conftest import node_config
    node = vmqapi.Node(node_config(tmp_path / "d"))
    start = threading.Thread.start

    def no_status_thread(thread):
        if thread.name == "vmqapi-status-history":
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_status_thread)
    with pytest.raises(vmqapi.VmqError, match="cannot start the node: can't start new thread"):
        node.start()
    assert node.wait(0) and not (tmp_path / "d" / vmqapi.NODE_FILE).exists()
    for port in [x["port"] for x in node.listeners()]:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_first_status_sample_failing_does_not_stop_the_start(monkeypatch):
    calls = []

    def status():
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("the broker did not answer")
        return {}

    monkeypatch.setattr(vmqapi, "history_sample", lambda values, at: (at,))
    history = vmqapi.StatusHistory(status, interval=0.01)
    history.start()
    try:
        deadline = time.monotonic() + 10
        while not history.points() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert history.points()
    finally:
        history.stop()


def test_a_node_json_that_cannot_be_written_stops_what_started_and_says_why(tmp_path, monkeypatch):
    from conftest import node_config
    import errno
    write = vmqapi.write_file_atomically
    ports = []
    node = vmqapi.Node(node_config(tmp_path / "d"))

    def disk_full(path, data, *args, **kwargs):
        if os.path.basename(path) == vmqapi.NODE_FILE:
            ports.extend(x["port"] for x in json.loads(data)["listeners"])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(path, data, *args, **kwargs)

    monkeypatch.setattr(vmqapi, "write_file_atomically", disk_full)
    with pytest.raises(vmqapi.ConfigError, match="cannot write .*node.json: No space left on device"):
        node.start()
    assert len(ports) >= 3 and not (tmp_path / "d" / vmqapi.NODE_FILE).exists()
    for port in ports:  # MQTT, HTTP and the cluster's
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    node.stop()
