"""The status answer's body: always valid JSON, whatever the log holds; `after` is ASCII digits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serverless.core import jsontext
from serverless.errors import InvalidParams
from serverless.status.body import json_array, parse_after, parse_attempt, usable_lines
from serverless.status.log import StatusLog


def strict_loads(body: bytes) -> object:
    """What a strict client does: UTF-8, no NaN/Infinity, no lone surrogates."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    text = body.decode("utf-8")
    value = json.loads(text, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


async def test_nan_and_infinity_read_as_null(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    node_errors = {
        "type": "error",
        "raw": {
            "node_errors": {"3": {"value": float("inf"), "other": float("nan"), "low": float("-inf"), "big": 1e308}}
        },
    }
    (tmp_path / "nan").write_bytes(
        json.dumps({"type": "progress"}).encode() + b"\n" + json.dumps(node_errors).encode() + b"\n"
    )
    body = await status.read("nan")
    assert b"Infinity" in (tmp_path / "nan").read_bytes(), "Python's json wrote the non-standard token"
    items = strict_loads(body)
    assert items[1]["raw"]["node_errors"]["3"] == {"value": None, "other": None, "low": None, "big": 1e308}


async def test_a_lone_surrogate_reads_as_an_escape(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    payload = {"type": "error", "raw": {"node_errors": {"\ud800": "bad node id"}}, "text": "é"}
    (tmp_path / "sur").write_bytes(jsontext.dumps(payload) + b"\n")
    body = await status.read("sur")
    assert b"\\ud800" in body
    assert strict_loads(body.replace(b"\\ud800", b"?")) == [
        {"type": "error", "raw": {"node_errors": {"?": "bad node id"}}, "text": "é"}
    ]
    assert json.loads(body) == [payload]


async def test_a_line_with_both_infinity_and_a_surrogate_is_valid_json(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    line = json.dumps({"type": "error", "\ud800": float("inf")}).encode()
    (tmp_path / "both").write_bytes(line + b"\n")
    body = await status.read("both")
    assert body.isascii() and b"Infinity" not in body
    assert json.loads(body) == [{"type": "error", "\ud800": None}]


def test_stored_lines_are_joined_as_they_are():
    raw = b'{"type": "status",   "data": {"x": "\xc3\xa9"}}\n{"b":1e999}\n'
    usable = usable_lines(raw)
    assert json_array(usable.lines) == b'[{"type": "status",   "data": {"x": "\xc3\xa9"}},{"b":1e999}]'


def test_lines_that_are_not_utf8_json_are_skipped():
    raw = b'{"a": 1}\n{"torn": \n\xff\xfe{}\n{"s": "\xed\xa0\x80"}\n\n{"b": 2}'
    usable = usable_lines(raw)
    assert usable.lines == [b'{"a": 1}', b'{"b": 2}']
    assert usable.last == {"b": 2} and not usable.ended


@given(
    st.lists(
        st.recursive(
            st.none()
            | st.booleans()
            | st.floats()
            | st.text()
            | st.integers()
            | st.sampled_from(["\ud800", "a\udfffb"]),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_any_stored_payloads_make_a_body_strict_clients_parse(payloads):
    raw = b"".join(jsontext.dumps(payload) + b"\n" for payload in payloads)
    body = json_array(usable_lines(raw).lines)
    strict_loads(body.replace(b"\\ud", b"\\u00"))  # lone surrogates stay escapes (valid JSON)
    assert len(json.loads(body)) == len(payloads)


@pytest.mark.parametrize("value, expected", [("0", 0), ("7", 7), ("000123", 123), ("9" * 12, 10**12 - 1)])
def test_after_takes_ascii_digits(value, expected):
    assert parse_after(value) == expected


@pytest.mark.parametrize("value", ["", "-1", "x", "²", "٣", "１", "1.0", " 1", "9" * 13])
def test_after_refuses_everything_else_as_invalid_params(value):
    with pytest.raises(InvalidParams):
        parse_after(value)


@pytest.mark.parametrize("value", ["0", "", "²", "-2"])
def test_attempt_is_a_whole_number_from_one(value):
    with pytest.raises(InvalidParams):
        parse_attempt(value)
    assert parse_attempt("3") == 3
