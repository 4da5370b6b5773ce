"""Shared Hypothesis strategies."""

from __future__ import annotations

from hypothesis import strategies as st

import vmqapi

# Text the grammar must carry through: '=', '+', '#', '%', '&', spaces, unicode.
SPECIALS = "=+#%&/?;~ -_.:@"
value_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00") | st.sampled_from(SPECIALS),
    min_size=1, max_size=20)
name_text = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", fullmatch=True)
word = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from(SPECIALS),
               min_size=1, max_size=12)

long_flag = st.tuples(name_text.map(lambda n: "--" + n), st.none() | value_text | st.just(""))
short_flag = st.tuples(st.sampled_from("abcdefghijklmnopqrstuvwxyz").map(lambda c: "-" + c),
                       st.none() | st.just("") | value_text.filter(lambda v: not v.startswith("=")))
argv = st.builds(
    vmqapi.Argv,
    words=st.lists(word, max_size=4).map(tuple),
    args=st.lists(st.tuples(name_text, value_text), max_size=5).map(tuple),
    flags=st.lists(long_flag | short_flag, max_size=5).map(tuple),
)
