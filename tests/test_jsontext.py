"""JSON in and out: payloads with spliced base64 (the same text json.dumps would give, without the
copies), and parsing that accepts what Python's json (and so ComfyUI) accepts."""

from __future__ import annotations

import base64
import json
import math

import pytest

from serverless.core.jsontext import Spliced, compact, dumps, loads


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


def test_parsing_accepts_what_pythons_json_accepts():
    assert loads(b'{"seed": 18446744073709551615, "n": 1.5, "s": "\\u00e9"}') == {
        "seed": 2**64 - 1,
        "n": 1.5,
        "s": "é",
    }
    assert loads('{"seed": 123456789012345678901234567890}') == {"seed": 123456789012345678901234567890}
    assert loads('{"t": "图像", "seed": 18446744073709551616}')["seed"] == 2**64  # text that is not ASCII
    assert loads(b'[[{"x": -18446744073709551617}], 1e300]') == [[{"x": -(2**64) - 1}], 1e300]
    padding = "x" * 100_000  # past the size up to which the text is scanned for long digit runs
    assert loads(f'{{"pad": "{padding}", "seed": 18446744073709551616}}')["seed"] == 2**64
    assert math.isnan(loads(b'{"cfg": NaN}')["cfg"])
    assert loads('"\\ud800"') == "\ud800"  # a lone surrogate, escaped


def test_what_is_not_json_gets_the_line_and_column():
    with pytest.raises(ValueError, match="line 2 column 7"):
        loads(b'{"a": 1,\n "b": }')
    with pytest.raises(ValueError):
        loads(b"\xff\xfe")


def test_a_prompt_for_comfyui_round_trips_even_past_64_bits():
    prompt = {"3": {"inputs": {"seed": 2**64 - 1, "text": "图像"}}, "4": {"inputs": {"seed": 2**70}}}
    assert json.loads(compact(prompt)) == prompt
    assert json.loads(compact({"text": "\ud800"})) == {"text": "\ud800"}
