"""Keep the map honest: banners, __all__, stdlib-only imports, no import side effects."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from conftest import ROOT
import vmqapi

SOURCE = open(os.path.join(ROOT, "vmqapi.py"), encoding="utf-8").read()


def test_banners_are_numbered_in_order_and_match_the_docstring():
    lines = SOURCE.splitlines()
    banners = []
    for n, line in enumerate(lines):
        match = re.match(r"^# ([0-9]+)\. (.+?) #+$", line)
        if match:
            assert lines[n - 1] == lines[n + 1] == "#" * 79, f"banner at line {n + 1} is not three lines"
            assert len(line) == 79, f"banner at line {n + 1} is not 79 columns"
            banners.append((int(match.group(1)), match.group(2)))
            assert lines[n + 2].startswith("# Owns: "), f"section {match.group(1)} says what it owns"
    assert [b[0] for b in banners] == list(range(len(banners)))
    contents = re.findall(r"^    ([0-9]+)\. (.+)$", vmqapi.__doc__, re.M)
    assert [(int(n), title) for n, title in contents] == banners


def test_public_names_exist_and_have_docstrings():
    for name in vmqapi.__all__:
        obj = getattr(vmqapi, name)
        assert obj.__doc__ and obj.__doc__.strip(), name


def test_only_standard_library_imports():
    tree = ast.parse(SOURCE)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names - {"__future__"} <= set(sys.stdlib_module_names)


def test_import_starts_nothing(tmp_path):
    script = ("import os, sys, threading; sys.path.insert(0, sys.argv[1]); before = set(os.listdir('.'));"
              "import vmqapi; assert threading.active_count() == 1, threading.enumerate();"
              "assert set(os.listdir('.')) == before, os.listdir('.'); print('ok')")
    result = subprocess.run([sys.executable, "-c", script, ROOT], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_every_command_has_a_usage():
    for cmd in vmqapi.CATALOGUE:
        assert cmd.doc.strip(), cmd.words
        assert cmd.usage().startswith("vmq-admin " + " ".join(cmd.words))


def sections():
    """Return {section number: (title, first line, last line)} from the banners (1-based, inclusive)."""
    lines = SOURCE.splitlines()
    marks = [(n + 1, re.match(r"^# ([0-9]+)\. (.+?) #+$", line)) for n, line in enumerate(lines)]
    marks = [(n, int(m.group(1)), m.group(2)) for n, m in marks if m]
    return {number: (title, start - 1, (marks[k + 1][0] - 2) if k + 1 < len(marks) else len(lines))
            for k, (start, number, title) in enumerate(marks)}


CORE = ("MQTT codec", "Topics", "Broker values", "Policy", "Routing", "Delivery", "Sessions", "Peers", "Engine",
        "Cluster state")
FORBIDDEN_MODULES = {"time", "secrets", "random", "threading", "socket", "asyncio", "os", "sqlite3", "ssl"}
FORBIDDEN_CALLS = {"open", "print", "input"}
TRANSPORT_METHODS = {"write", "writelines", "close", "abort", "pause_reading", "resume_reading", "get_extra_info",
                     "sendall", "send", "recv", "flush"}


def test_core_sections_have_no_clock_randomness_file_lock_or_transport():
    tree = ast.parse(SOURCE)
    core = [(start, end, title) for title, start, end in sections().values() if title.startswith(CORE)]
    assert len(core) == len(CORE), core
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        title = next((t for s, e, t in core if s <= line <= e), None)
        if title is None:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in FORBIDDEN_MODULES:
            found.append(f"{line}: {node.value.id}.{node.attr} in {title}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append(f"{line}: {node.func.id}() in {title}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in TRANSPORT_METHODS:
            found.append(f"{line}: .{node.func.attr}() in {title}")
        elif isinstance(node, ast.Name) and node.id.endswith("_lock"):
            found.append(f"{line}: {node.id} in {title}")
    assert not found, "\n".join(found)


def test_rooms_stay_small():
    total = len(SOURCE.splitlines())
    for number, (title, start, end) in sections().items():
        assert end - start + 1 <= 850, f"section {number} ({title}) has {end - start + 1} lines"
    for node in ast.parse(SOURCE).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            size = node.end_lineno - node.lineno + 1
            assert size <= total // 10, f"{node.name} is {size} lines, over a tenth of the file"
            if isinstance(node, ast.ClassDef):
                assert size <= 600, f"class {node.name} is {size} lines"


def test_the_quick_run_names_real_tests_and_covers_the_pure_sections():
    from conftest import HERE, QUICK
    for name, spec in QUICK.items():
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        for test in () if spec == "*" else spec:
            assert re.search(rf"^def {test}\(", text, re.M), f"QUICK names {test}, which {name} does not define"
    pure = {"test_config.py", "test_codec.py", "test_topics.py", "test_commands.py", "test_broker_model.py",
            "test_cluster_state.py", "test_cluster_kept.py", "test_engine_cluster.py", "test_keystore.py"}
    assert {name for name, spec in QUICK.items() if spec == "*"} >= pure
