"""Command machinery: the argv grammar, binding, the table, elements and renderers."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import example, given, strategies as st

import strategies
import vmqapi
from vmqapi import Alert, Argv, Command, CommandTable, ListElement, Param, Table, Text


# -- the query translator ----------------------------------------------------

@given(strategies.argv)
@example(Argv(("session", "show"), (("client-id", "abc=="),), (("--payload", "a=b"),)))
@example(Argv((), (("t", "a+b #c%20&"),), (("-l", "10"), ("--x", ""))))
def test_parse_inverts_render(argv):
    path, query = vmqapi.render_query(argv)
    words = vmqapi.parse_path_words(path[len("/api/v1/"):]) if argv.words else ()
    assert vmqapi.parse_query(words, query) == argv


def test_query_grammar():
    argv = vmqapi.parse_query(("s",), "client-id=abc==&--cleanup&--topic=a%2Bb%23&t=x+y&-l10&-m")
    assert argv.args == (("client-id", "abc=="), ("t", "x y"))
    assert argv.flags == (("--cleanup", None), ("--topic", "a+b#"), ("-l", "10"), ("-m", None))


@pytest.mark.parametrize("query", ["client-id", "client-id=", "=x", "--", "-", "a=%zz", "a=%ff"])
def test_query_errors_are_bad_requests(query):
    with pytest.raises(vmqapi.BadRequest):
        vmqapi.parse_query((), query)


def test_path_words_decode_without_plus():
    assert vmqapi.parse_path_words("a%2Fb/c+d/") == ("a/b", "c+d")


@given(strategies.argv.filter(lambda a: a.words and all(not w.startswith("-") and "=" not in w for w in a.words)))
def test_cli_tokens_match_query(argv):
    tokens = list(argv.words) + [f"{k}={v}" for k, v in argv.args]
    for name, value in argv.flags:
        tokens.append(name if value is None else (f"{name}={value}" if name.startswith("--") else
                                                  (name + value if value else name + "=")))
    assert vmqapi.parse_cli_tokens(tokens) == argv


def test_cli_rejects_stray_word_after_arguments():
    with pytest.raises(vmqapi.BadRequest):
        vmqapi.parse_cli_tokens(["session", "show", "--limit=1", "oops"])


# -- binding -----------------------------------------------------------------

def _handler(call):
    return Text(json.dumps({"args": dict(call.args), "flags": dict(call.flags), "extra": list(call.extra)}))


TABLE = CommandTable([
    Command(("thing", "do"), _handler, keys=(Param("id"), Param("n", vmqapi.parse_positive_int)),
            flags=(Param("cleanup", short="c", value="none"), Param("limit", int, short="l"),
                   Param("topic", value="optional")), required=("id",), doc="Do a thing."),
    Command(("thing", "do", "more"), _handler),
    Command(("show",), _handler, extra_words="key"),
])


def run(query, words=("thing", "do")):
    call, wants_help = vmqapi.prepare(TABLE, vmqapi.parse_query(words, query), None)
    return json.loads(vmqapi.execute(call, wants_help)[0].text) if not wants_help else "help"


def test_arguments_and_flags_in_any_order():
    expected = {"args": {"id": "x", "n": 3}, "flags": {"cleanup": None, "limit": 5, "topic": "t"}, "extra": []}
    assert run("--cleanup&id=x&-l5&n=3&--topic=t") == expected
    assert run("id=x&n=3&--topic=t&-c&--limit=5") == expected


@pytest.mark.parametrize("query, error", [
    ("", vmqapi.MissingArgument),
    ("id=x&id=y", vmqapi.BadRequest),
    ("id=x&bogus=1", vmqapi.InvalidKey),
    ("id=x&--bogus", vmqapi.InvalidFlag),
    ("id=x&-z", vmqapi.InvalidFlag),
    ("id=x&n=0", vmqapi.InvalidValue),
    ("id=x&n=abc", vmqapi.InvalidValue),
    ("id=x&--cleanup=yes", vmqapi.InvalidValue),
    ("id=x&--limit", vmqapi.InvalidValue),
    ("id=x&--cleanup&-c", vmqapi.BadRequest),
    ("id=x&--format=xml", vmqapi.InvalidValue),
])
def test_bad_arguments(query, error):
    with pytest.raises(error) as info:
        run(query)
    assert type(info.value) is error
    assert info.value.http_status == 400 and info.value.usage


def test_help_needs_no_mandatory_argument():
    assert run("--help") == "help"
    assert run("-h") == "help"


def test_longest_command_wins_and_extra_words():
    assert run("", ("thing", "do", "more"))["args"] == {}
    assert run("", ("show", "a", "b"))["extra"] == ["a", "b"]
    with pytest.raises(vmqapi.UnknownCommand, match="continues with: do"):
        run("", ("thing",))
    with pytest.raises(vmqapi.UnknownCommand):
        run("", ("thing", "do", "less"))


def test_register_adds_a_command():
    table = CommandTable()
    table.register(("gateway", "show"), lambda call: "up " + call.args["id"], keys=["id"], flags=["verbose"],
                   usage="Show the gateway.")
    call, _ = vmqapi.prepare(table, Argv(("gateway", "show"), (("id", "g1"),), (("--verbose", None),)), None)
    assert vmqapi.execute(call) == [Text("up g1")]
    assert "gateway show [id=<id>] [--verbose[=<value>]]" in table.usage()


# -- elements and rendering --------------------------------------------------

def test_json_framing():
    assert vmqapi.render_json([Text("Done")]) == b'{"text":"Done","type":"text"}'
    assert vmqapi.render_json([]) == b"[]\n"
    two = vmqapi.render_json([Text("a"), Table(({"b": 1, "a": True},))])
    assert two == b'[{"text":"a","type":"text"},{"table":[{"b":1,"a":true}],"type":"table"}]\n'
    assert vmqapi.render_json([vmqapi.alert("x")]) == b'{"alert":[{"text":"x","type":"text"}],"type":"alert"}'
    assert vmqapi.render_json([ListElement(("a",), "t")]) == b'{"list":["a"],"title":"t","type":"list"}'


def test_table_refuses_cells_json_cannot_carry():
    with pytest.raises(TypeError):
        Table(({"a": (1, 2)},))


elements = st.recursive(
    st.builds(Text, st.text()) | st.builds(
        lambda rows: Table(tuple(rows)),
        st.lists(st.dictionaries(st.text(min_size=1, max_size=5), st.none() | st.booleans() | st.integers()
                                 | st.text(), max_size=4), max_size=3)),
    lambda inner: st.builds(lambda items: Alert(tuple(items)), st.lists(inner, max_size=3)),
    max_leaves=5)


@given(st.lists(elements, max_size=4))
def test_elements_round_trip_through_json(items):
    body = vmqapi.render_json(items)
    again = vmqapi.elements_from_json(json.loads(body))
    assert vmqapi.render_json(again) == body


def test_boxed_table_like_vmq_admin():
    out = vmqapi.render_box(Table(({"Key": "JxctXkZ1OTVnlwvguSCE9KtujacMkOLF"},)))
    assert out == ("+--------------------------------+\n"
                   "|              Key               |\n"
                   "+--------------------------------+\n"
                   "|JxctXkZ1OTVnlwvguSCE9KtujacMkOLF|\n"
                   "+--------------------------------+\n")


def test_boxed_table_multiline_cells_and_empty_table():
    out = vmqapi.render_box(Table(({"Hook(s)": "a\nbb\n", "n": True},)))
    assert out.splitlines()[3:5] == ["|a      |true|", "|bb     |    |"]
    assert vmqapi.render_box(Table((), ("A", "B"))) == "+-+-+\n|A|B|\n+-+-+\n+-+-+\n"


def test_alerts_go_to_stderr():
    out, err = vmqapi.render_human([Text("Done"), vmqapi.alert("bad")])
    assert (out, err) == ("Done\n", "bad\n")


# -- session show's selection and filtering ------------------------------------

RECORDS = [
    {"client_id": "b", "mountpoint": "", "is_online": True, "user": None, "peer_host": "127.0.0.1",
     "peer_port": 2, "protocol": 4, "subscriptions": [{"topic": "x/1", "qos": 0, "rap": False, "no_local": False},
                                                       {"topic": "x/#", "qos": 1, "rap": False, "no_local": False}],
     "messages": []},
    {"client_id": "a", "mountpoint": "", "is_online": False, "user": "u", "peer_host": "127.0.0.1",
     "peer_port": 1, "protocol": 3, "subscriptions": [],
     "messages": [{"msg_ref": "r1", "msg_qos": 1, "routing_key": "x/1", "dup": False, "payload": "hi"}]},
]


def test_session_table_defaults_and_order():
    table = vmqapi.session_table(RECORDS, {})
    assert [r["client_id"] for r in table.rows] == ["a", "b"]
    assert list(table.rows[0]) == sorted(vmqapi.SESSION_DEFAULT_COLUMNS)


def test_session_table_filters_select_and_expand():
    flags = {"topic": None, "qos": None, "client_id": "b"}
    assert [(r["topic"], r["qos"]) for r in vmqapi.session_table(RECORDS, flags).rows] == [("x/1", 0), ("x/#", 1)]
    assert vmqapi.session_table(RECORDS, {"is_online": "false"}).rows[0]["client_id"] == "a"
    assert vmqapi.session_table(RECORDS, {"protocol": "3"}).rows[0]["client_id"] == "a"
    assert vmqapi.session_table(RECORDS, {"client_id": "~^[ab]$", "limit": 1, "offset": 1}).rows[0]["client_id"] == "b"
    rows = vmqapi.session_table(RECORDS, {"payload": None, "msg_qos": "1"}).rows
    assert rows == ({"payload": "hi"},)
    assert vmqapi.session_table(RECORDS, {"user": "null"}).rows[0]["client_id"] == "b"


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*$", "(?:a*)*b", "(x+x+)+y", r"(\w)\1", "(?P<n>a)(?P=n)",
                                     "(?=a)a", "a*a*a*a*b", "a" * 101, "x|" * 9 + "y"])
def test_regexes_that_can_backtrack_without_bound_are_refused(pattern):
    session_show = next(c for c in vmqapi.CATALOGUE if c.words == ("session", "show"))
    with pytest.raises(vmqapi.InvalidValue, match="regular expression refused"):
        session_show.flag("--client_id").cast("~" + pattern)


@pytest.mark.parametrize("pattern", ["^client-[0-9]+$", "(?i)^abc", ".*foo.*", "^(?:ab|cd)x", "[a(]+x", r"\(a+\)+",
                                     "a{2,5}b", "(?P<name>abc)"])
def test_ordinary_regexes_are_accepted(pattern):
    assert vmqapi.parse_regex_or_text("~" + pattern) == "~" + pattern


def test_a_regex_looks_at_a_bounded_part_of_a_long_value():
    long_topic = {**RECORDS[0], "client_id": "long", "subscriptions": [
        {"topic": "a" * 3000, "qos": 0, "rap": False, "no_local": False}]}
    started = time.perf_counter()
    assert vmqapi.session_table([long_topic], {"topic": "~.*.*x"}).rows == ()  # ~2 s without the cap
    assert time.perf_counter() - started < 0.3
    assert vmqapi.regex_text_limit(".*.*x") == 256 and vmqapi.regex_text_limit("abc") == vmqapi.REGEX_TEXT_MAX
    assert vmqapi.session_table([long_topic], {"topic": "~^a{200}", "client_id": None}).rows == ({"client_id": "long"},)


def test_rowtimeout_stops_a_scan_that_finds_nothing():
    ticks = iter(range(10**6))  # each clock read is one second later
    records = [{**RECORDS[1], "client_id": f"c{n}"} for n in range(50)]
    answer = vmqapi.session_table(records, {"client_id": "~^c4", "rowtimeout": 3000}, clock=lambda: next(ticks))
    table, note = answer
    assert table.rows == ()  # four misses (c0, c1, c10, c11) took longer than 3 s: the scan stopped
    assert isinstance(note, Alert) and "--rowtimeout=3000" in note.items[0].text
    fast = vmqapi.session_table(records, {"client_id": "~^c4"})
    assert [r["client_id"] for r in fast.rows] == ["c4"] + [f"c{n}" for n in range(40, 50)]


@given(st.lists(st.dictionaries(st.sampled_from("abc"), st.integers() | st.text(max_size=3), max_size=3),
                max_size=30), st.integers(1, 7))
def test_chunked_table_json_equals_one_dumps(rows, chunk):
    import unittest.mock
    table = Table(tuple(rows))
    expected = json.dumps(table.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    with unittest.mock.patch.object(vmqapi, "JSON_CHUNK", chunk):
        assert vmqapi.render_json([table]) == expected
        assert vmqapi.render_json([table, Text("x")]) == b"[" + expected + b',{"text":"x","type":"text"}]\n'


def test_the_node_and_the_listeners_implement_their_interfaces(tmp_path):
    """Node has every member of NodeApi, and both listener kinds every method of Listener."""
    node = vmqapi.Node({"data_dir": str(tmp_path)})  # not started: what __init__ sets
    for name in [*vmqapi.NodeApi.__annotations__, *(n for n in vars(vmqapi.NodeApi) if not n.startswith("_"))]:
        assert hasattr(node, name), name
    methods = [n for n, v in vars(vmqapi.Listener).items() if callable(v) and not n.startswith("_")]
    for cls in (vmqapi.MqttListener, vmqapi.HttpListener):
        assert [n for n in methods if not callable(getattr(cls, n, None))] == [], cls
