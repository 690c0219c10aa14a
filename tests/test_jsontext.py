"""Payload JSON with spliced base64: the same text json.dumps would give, without the copies."""

from __future__ import annotations

import base64
import json

from serverless.core.jsontext import Spliced, dumps


def test_spliced_values_read_back_as_ordinary_strings():
    first, second = base64.b64encode(b"\x89PNG" * 1000), base64.b64encode(b"abc")
    payload = {
        "type": "serverless_api",
        "data": {
            "results": [
                {"base64": {"content": Spliced(first)}, "name": "图像"},
                {"base64": {"content": Spliced(second)}},
                {"base64": {"content": None}},
            ]
        },
    }
    text = dumps(payload)
    decoded = json.loads(text)
    contents = [r["base64"]["content"] for r in decoded["data"]["results"]]
    assert contents == [first.decode(), second.decode(), None]
    assert "图像".encode() in text, "non-ASCII stays readable"


def test_a_lone_surrogate_is_escaped_instead_of_breaking_utf8():
    text = dumps({"error_message": "bad \udc80 value", "raw": {"b": Spliced(b"QUJD")}})
    assert json.loads(text) == {"error_message": "bad \udc80 value", "raw": {"b": "QUJD"}}


def test_without_spliced_values_it_is_plain_json():
    payload = {"a": [1, 2.5, None, True], "b": "x"}
    assert json.loads(dumps(payload)) == payload
