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


def _top_level_names(tree):
    """Return {module-level name: its defining statement's first line}."""
    names = {}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                targets += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
        for name in targets:
            names.setdefault(name, node.lineno)
    return names


def _annotation_names(tree):
    """Return the ids of Name nodes inside annotations (strings at run time: ``from __future__ import annotations``)."""
    found = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations = [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs + [args.vararg, args.kwarg]
                           if a is not None and a.annotation is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        found |= {id(n) for a in annotations if a is not None for n in ast.walk(a)}
    return found


# Annotations that name a class defined further down, each for a reason: a link and the listener
# that made it name each other; NodeApi's attributes are values the HTTP part defines; the
# cluster's calls run on the Node that owns the cluster.
FORWARD_ANNOTATIONS = {"MqttListener", "HttpMessage", "StatusHistory", "StatusRows", "UnfinishedRequests", "Node"}


def _local_loads(tree):
    """Return the ids of Name nodes that read a function's own argument or local variable."""
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = fn.args
            own = {a.arg for a in args.args + args.kwonlyargs + args.posonlyargs}
            own |= {a.arg for a in (args.vararg, args.kwarg) if a}
            if not isinstance(fn, ast.Lambda):
                own |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in own}
    return local


def test_each_section_uses_only_what_stands_above_it():
    tree = ast.parse(SOURCE)
    spans = sorted((start, number) for number, (title, start, end) in sections().items())

    def section_of(line):
        return max((number for start, number in spans if start <= line), default=-1)
    defined = {name: section_of(line) for name, line in _top_level_names(tree).items()}
    local, annotations = _local_loads(tree), _annotation_names(tree)
    found = set()
    for top in tree.body:
        here = section_of(top.lineno)
        for node in ast.walk(top):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in local \
                    and defined.get(node.id, -1) > here \
                    and not (id(node) in annotations and node.id in FORWARD_ANNOTATIONS):
                found.add(f"{node.id} (section {defined[node.id]}) used in section {here}, line {node.lineno}")
    assert not found, "\n".join(sorted(found))


def test_no_class_with_its_bases_is_over_600_lines():
    classes = {node.name: node for node in ast.parse(SOURCE).body if isinstance(node, ast.ClassDef)}

    def size(name):
        node = classes[name]
        bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
        return node.end_lineno - node.lineno + 1 + sum(size(b) for b in bases)
    for name in classes:
        assert size(name) <= 600, f"class {name} with its bases is {size(name)} lines"


def test_the_node_is_reached_through_its_written_interface():
    assert "node: Any" not in SOURCE
    assert "broker_call(" not in SOURCE


def test_comments_cite_only_what_a_reader_of_the_repository_can_open():
    cited = set(re.findall(r"\b([A-Za-z_]+\.md)\b", SOURCE))
    assert cited <= {"README.md"}, f"the repository holds only README.md of these: {cited}"
    assert not re.search(r"\bsection [0-9]+\b", SOURCE, re.I), "cite a section by its name: numbers move"
