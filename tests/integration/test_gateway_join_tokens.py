"""Join tokens at a real gateway: nodes without a valid token are refused at hello (4001), nodes with one join
(a FakeNode and a real NodeAgent), secrets rotate through a file while the gateway runs, an open gateway warns."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect

from services.common.join_tokens import issue, new_secret
from services.gateway.admission import CLOSE_UNAUTHORIZED
from tests.integration.gateway_fixtures import (
    FakeNode,
    closed_with,
    head,
    hello,
    make_agent,
    running_agent,
    running_gateway,
    watching,
)
from tests.polling import eventually

SECRET, OTHER = new_secret(), new_secret()
LATER = int(time.time()) + 3600


async def refused(url: str, node_id: str, **fields: object) -> str:
    """The refusal a hello gets: asserts close code 4001, returns the error text."""
    websocket = await connect(url, close_timeout=1)
    await websocket.send(json.dumps(hello(node_id, **fields)))
    received, code = await closed_with(websocket)
    assert code == CLOSE_UNAUTHORIZED, (code, received)
    assert received[0]["kind"] == "error" and received[0]["fatal"] is True
    return received[0]["message"]


@pytest.mark.timeout(60)
async def test_only_nodes_with_a_valid_token_join_and_the_others_are_unharmed(tmp_path: Path) -> None:
    counted = REGISTRY.get_sample_value("synapse_gateway_rejected_messages_total", {"reason": "join_token"}) or 0.0
    async with running_gateway(join_secrets=[SECRET]) as gateway, watching(gateway) as watch:
        member = await FakeNode.join(gateway.ws_url, "member", compute=head, join_token=issue(SECRET, expires_at=LATER))
        assert "no join token" in await refused(gateway.ws_url, "stranger")
        assert "matches none" in await refused(gateway.ws_url, "forger", join_token=issue(OTHER, expires_at=LATER))
        assert "expired" in await refused(gateway.ws_url, "late", join_token=issue(SECRET, expires_at=1))
        scoped = issue(SECRET, expires_at=LATER, scope="laptop-1")
        assert "is for node 'laptop-1', not 'thief'" in await refused(gateway.ws_url, "thief", join_token=scoped)
        laptop = await FakeNode.join(gateway.ws_url, "laptop-1", join_token=scoped)
        agent = make_agent(gateway.ws_url, "native-1", tmp_path / "cache", join_token=issue(SECRET, expires_at=LATER))
        async with running_agent(agent):
            await watch.until("native-1", "joined")
        await watch.until("laptop-1", "joined")
        assert {event.node.node_id for event in watch.events} == {"member", "laptop-1", "native-1"}
        assert "member" in gateway.hub.connections
        await laptop.close()
        await member.close()
    after = REGISTRY.get_sample_value("synapse_gateway_rejected_messages_total", {"reason": "join_token"})
    assert after - counted == 4


@pytest.mark.timeout(60)
async def test_secrets_rotate_through_the_file_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "join-secrets"
    path.write_text(f"{SECRET}\n")
    old_token, new_token = issue(SECRET, expires_at=LATER), issue(OTHER, expires_at=LATER)
    async with running_gateway(join_secrets_file=path) as gateway:
        veteran = await FakeNode.join(gateway.ws_url, "veteran", compute=head, join_token=old_token)
        assert "matches none" in await refused(gateway.ws_url, "early", join_token=new_token)
        path.write_text(f"{OTHER}\n{SECRET}\n")  # 1. the new secret first, the old one still held
        both = [await FakeNode.join(gateway.ws_url, node, join_token=token)
                for node, token in [("with-new", new_token), ("with-old", old_token)]]  # fmt: skip
        path.write_text(f"{OTHER}\n")  # 3. the old secret dropped
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert "matches none" in await refused(gateway.ws_url, "stale", join_token=old_token)
        rejoined = await FakeNode.join(gateway.ws_url, "rejoined", join_token=new_token)
        assert "veteran" in gateway.hub.connections, "tokens are checked at hello: a connected node stays"
        for node in [*both, rejoined, veteran]:
            await node.close()
        await eventually(lambda: not gateway.hub.connections, 5, "every node leaving")


@pytest.mark.timeout(30)
async def test_an_open_gateway_admits_any_node_and_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.gateway.websocket_server")
    async with running_gateway() as gateway:
        node = await FakeNode.join(gateway.ws_url, "anyone", join_token="whatever")
        await node.close()
    assert [record for record in caplog.records if record.getMessage() == "join_tokens_off"]
    caplog.clear()
    async with running_gateway(join_secrets=[SECRET]):
        pass
    assert not [record for record in caplog.records if record.getMessage() == "join_tokens_off"]
