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
