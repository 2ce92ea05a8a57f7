"""The native node's gateway URL list: one URL, several comma-separated, a JSON list; anything but ws(s) refused."""

from __future__ import annotations

import pydantic
import pytest

from services.node.settings import NodeSettings


def test_one_url_or_several_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeSettings().gateway_url == ["ws://127.0.0.1:8765/ws"]
    monkeypatch.setenv("SYNAPSE_NODE_GATEWAY_URL", "wss://a:8765/ws")
    assert NodeSettings().gateway_url == ["wss://a:8765/ws"]
    monkeypatch.setenv("SYNAPSE_NODE_GATEWAY_URL", " ws://a:8765/ws, ws://b:8765/ws ,")
    assert NodeSettings().gateway_url == ["ws://a:8765/ws", "ws://b:8765/ws"]
    monkeypatch.setenv("SYNAPSE_NODE_GATEWAY_URL", '["ws://a/ws", "wss://b/ws"]')
    assert NodeSettings().gateway_url == ["ws://a/ws", "wss://b/ws"]


@pytest.mark.parametrize("value", ["", ",", "http://a:8765/ws", "ws://a/ws,a:8765"])
def test_no_url_or_a_url_that_is_not_a_websocket_is_refused(value: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="gateway_url"):
        NodeSettings(gateway_url=value)
