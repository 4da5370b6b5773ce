"""Topic rules and the subscription trie against a naive matcher."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

import strategies
import vmqapi


def naive_match(topic_filter, topic):
    """Ten lines of the MQTT 3.1.1 4.7 rules, level by level."""
    if topic.startswith("$") and topic_filter[:1] in "+#" and topic_filter:
        return False
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i == len(t) or level not in ("+", t[i]):
            return False
    return len(f) == len(t)


topics = st.lists(st.sampled_from(["a", "b", "$SYS", "", "c d"]), min_size=1, max_size=4).map("/".join)


@given(st.lists(st.tuples(strategies.topic_filter, st.integers(0, 2)), max_size=12), st.lists(topics, max_size=8),
       st.data())
def test_trie_agrees_with_naive_matcher(subs, probes, data):
    trie = vmqapi.TopicTrie()
    model = {}
    for n, (topic_filter, qos) in enumerate(subs):
        subscriber = n % 4
        trie.add(topic_filter, subscriber, qos)
        model[(topic_filter, subscriber)] = qos
    removals = data.draw(st.lists(st.sampled_from(sorted(model)), max_size=4)) if model else []
    for topic_filter, subscriber in removals:
        if (topic_filter, subscriber) in model:
            assert trie.remove(topic_filter, subscriber)
            del model[(topic_filter, subscriber)]
    assert trie.count == len(model)
    for topic in probes:
        expected = {}
        for (topic_filter, subscriber), qos in model.items():
            if naive_match(topic_filter, topic):
                expected[subscriber] = max(qos, expected.get(subscriber, -1))
        assert trie.match(topic) == expected
        assert all(vmqapi.topic_matches(f, topic) == naive_match(f, topic) for f, _ in model)


def test_removing_everything_prunes_the_trie():
    trie = vmqapi.TopicTrie()
    trie.add("a/b/c", 1, 0)
    trie.add("a/+", 2, 1)
    assert trie.remove("a/b/c", 1) and trie.remove("a/+", 2) and not trie.remove("a/+", 2)
    assert trie._root.children == {}


@pytest.mark.parametrize("topic_filter, ok", [
    ("a/#", True), ("#", True), ("+/+", True), ("a/#/b", False), ("a#", False), ("a/b+", False), ("", False),
    ("/", True), ("$SYS/#", True),
])
def test_filter_validation(topic_filter, ok):
    assert vmqapi.valid_topic_filter(topic_filter) is ok


def test_dollar_topics_are_not_matched_by_leading_wildcards():
    assert not vmqapi.topic_matches("#", "$SYS/x") and not vmqapi.topic_matches("+/x", "$SYS/x")
    assert vmqapi.topic_matches("$SYS/#", "$SYS/x")


@given(st.lists(st.tuples(st.booleans(), topics), max_size=20), st.lists(strategies.topic_filter, max_size=6))
def test_retain_tree_agrees_with_a_scan(ops, filters):
    tree, model = vmqapi.RetainTree(), {}
    for n, (store, topic) in enumerate(ops):
        if store:
            tree[topic] = n
            model[topic] = n
        else:
            assert tree.pop(topic) == model.pop(topic, None)
    assert len(tree) == len(model) and tree.items() == sorted(model.items())
    for topic_filter in filters:
        expected = [(t, model[t]) for t in sorted(model) if naive_match(topic_filter, t)]
        assert sorted((t, v) for t, v in tree.walk(topic_filter) if v is not None) == expected


@given(st.lists(topics, min_size=1, max_size=20), st.lists(st.tuples(st.booleans(), topics), max_size=20),
       strategies.topic_filter)
def test_retain_tree_walk_survives_changes_between_steps(initial, ops, topic_filter):
    """A walk goes on while the tree changes: what it yields is what the tree holds at that step."""
    tree = vmqapi.RetainTree()
    for n, topic in enumerate(initial):
        tree[topic] = n
    walk = tree.walk(topic_filter)
    for store, topic in ops + [(False, "")] * 200:  # bounded: a walk of 20 topics has fewer steps
        for topic_seen, value in walk:
            assert value is None or (tree.get(topic_seen) == value and naive_match(topic_filter, topic_seen))
            break
        if store:
            tree[topic] = -1
        else:
            tree.pop(topic)


@given(st.text())
def test_valid_topic_name_answers_any_string_as_topic_name_problem_does(topic):
    """One rule for a topic name: a lone surrogate or U+0000 is refused, never an exception."""
    assert vmqapi.valid_topic_name(topic) == (vmqapi.topic_name_problem(topic) is None)
    assert not vmqapi.valid_topic_name("a/\ud800") and not vmqapi.valid_topic_name("a\x00b")
