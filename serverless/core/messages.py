"""Classification of ComfyUI websocket messages (pure).

A message is parsed once, for routing; its text is kept exactly as ComfyUI sent it, because the
contract forwards it byte for byte. A message read back from a prompt's history after a broken
websocket (`from_history`) is not live: it tells how the prompt went, but was never sent to us and
is not forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import jsontext


@dataclass(frozen=True, slots=True)
class Message:
    """One text message from ComfyUI's websocket (or, with `live` false, from a history entry)."""

    text: str
    type: str
    data: dict[str, Any]
    live: bool = True

    @property
    def prompt_id(self) -> str | None:
        value = self.data.get("prompt_id")
        return value if isinstance(value, str) else None

    def ends(self, prompt_id: str) -> bool:
        """`executing` with `node: null` for our prompt: always ComfyUI's last message of a job."""
        return self.type == "executing" and self.data.get("node") is None and self.prompt_id == prompt_id

    @property
    def output(self) -> dict[str, Any] | None:
        """The UI output of an `executed` message (what history will hold for that node)."""
        if self.type != "executed":
            return None
        output = self.data.get("output")
        return output if isinstance(output, dict) else None


def parse_message(text: str) -> Message | None:
    """Parse a websocket text frame; None for anything that is not a typed JSON object."""
    try:
        value = jsontext.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return None
    data = value.get("data")
    return Message(text=text, type=value["type"], data=data if isinstance(data, dict) else {})


def from_history(name: str, data: dict[str, Any]) -> Message:
    """A `[name, data]` pair of a history entry's `status.messages`, as a message that is not live."""
    return Message(text="", type=name, data=data, live=False)
