"""Join tokens (services/common/join_tokens.py): issue, verify, refuse forged, expired and misdirected ones, rotate
secrets in settings or in a file re-read while the gateway runs, and the `synapse token` command."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.cli import main as synapse
from services.common.errors import FailedPrecondition
from services.common.join_tokens import JoinTokenRefused, JoinTokens, issue, new_secret
from services.gateway.settings import GatewaySettings

OLD, NEW = new_secret(), new_secret()
LATER = int(time.time()) + 3600


def refusal(tokens: JoinTokens, token: str, node_id: str = "laptop-1", now: float | None = None) -> str:
    with pytest.raises(JoinTokenRefused) as caught:
        tokens.verify(token, node_id, now)
    return str(caught.value)


def test_a_token_admits_any_node_or_the_one_it_names() -> None:
    tokens = JoinTokens([NEW])
    assert tokens.enabled
    assert tokens.verify(issue(NEW, expires_at=LATER), "laptop-1") == "*"
    assert tokens.verify(issue(NEW, expires_at=LATER, scope="gpu.lab-2"), "gpu.lab-2") == "gpu.lab-2"
    assert "is for node 'gpu.lab-2', not 'laptop-1'" in refusal(tokens, issue(NEW, expires_at=LATER, scope="gpu.lab-2"))


def test_forged_expired_and_malformed_tokens_are_refused_saying_why() -> None:
    tokens = JoinTokens([NEW])
    good = issue(NEW, expires_at=LATER)
    scope, expiry, signature = good.rsplit(".", 2)
    forged = {
        "signed with another secret": issue(OLD, expires_at=LATER),
        "expiry moved": f"{scope}.{LATER + 86400}.{signature}",
        "scope widened": f"laptop-1.{expiry}.{issue(NEW, expires_at=LATER, scope='other').rsplit('.', 1)[1]}",
        "one signature character changed": f"{scope}.{expiry}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}",
    }
    for case, token in forged.items():
        assert "matches none of this gateway's secrets" in refusal(tokens, token), case
    assert "expired at" in refusal(tokens, good, now=LATER)
    assert "expired at" in refusal(tokens, issue(NEW, expires_at=1))
    for malformed in ["x", "a.b", "*.123.short", "*.12x.{}".format("A" * 43), "bad scope.1.{}".format("A" * 43),
                      f"*.{'9' * 13}.{'A' * 43}", good + "="]:  # fmt: skip
        assert "malformed join token" in refusal(tokens, malformed), malformed
    assert "no join token" in refusal(tokens, "")


def test_rotation_accepts_old_and_new_until_the_old_secret_is_dropped() -> None:
    old_token, new_token = issue(OLD, expires_at=LATER), issue(NEW, expires_at=LATER)
    before, during, after = JoinTokens([OLD]), JoinTokens([NEW, OLD]), JoinTokens([NEW])
    assert before.verify(old_token, "n") and during.verify(old_token, "n") and during.verify(new_token, "n")
    assert after.verify(new_token, "n")
    assert "matches none" in refusal(after, old_token)


def test_a_secrets_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    """Rotation with no gateway restart: edit the file, the next hello sees it."""
    path = tmp_path / "join-secrets"
    path.write_text(f"# newest first\n{OLD}\n\n")
    tokens = JoinTokens([], path)
    old_token, new_token = issue(OLD, expires_at=LATER), issue(NEW, expires_at=LATER)
    assert tokens.verify(old_token, "n") == "*"
    assert "matches none" in refusal(tokens, new_token)
    path.write_text(f"{NEW}\n{OLD}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    assert tokens.verify(new_token, "n") and tokens.verify(old_token, "n")
    path.write_text(f"{NEW}\n")
    assert "matches none" in refusal(tokens, old_token)
    path.write_text("too short\n")  # a bad edit: the last good secrets stay
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert tokens.verify(new_token, "n")


def test_a_named_secrets_file_closes_the_gateway_even_empty_and_must_be_readable(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    tokens = JoinTokens([], empty)
    assert tokens.enabled and "matches none" in refusal(tokens, issue(NEW, expires_at=LATER))
    with pytest.raises(FailedPrecondition, match="cannot read join secrets"):
        JoinTokens([], tmp_path / "missing")
    assert not JoinTokens([]).enabled


def test_settings_take_comma_separated_or_json_secrets_and_refuse_weak_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_GATEWAY_JOIN_SECRETS", f"{NEW}, {OLD}")
    assert GatewaySettings().join_secrets == [NEW, OLD]
    monkeypatch.setenv("SYNAPSE_GATEWAY_JOIN_SECRETS", f'["{NEW}"]')
    assert GatewaySettings().join_secrets == [NEW]
    monkeypatch.setenv("SYNAPSE_GATEWAY_JOIN_SECRETS", "hunter2")
    with pytest.raises(ValueError, match="shorter than 16 characters") as caught:
        GatewaySettings()
    assert "hunter2" not in str(caught.value), "a rejected secret must not be echoed"
    monkeypatch.delenv("SYNAPSE_GATEWAY_JOIN_SECRETS")
    assert GatewaySettings().join_secrets == []


def test_synapse_token_issues_what_the_gateway_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SYNAPSE_GATEWAY_JOIN_SECRETS", f"{NEW},{OLD}")
    assert synapse(["token", "--node", "laptop-1", "--days", "2"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert JoinTokens([NEW]).verify(token, "laptop-1") == "laptop-1"  # signed with the first secret
    assert f"SYNAPSE_NODE_JOIN_TOKEN={token}" in err and f"?join_token={token}" in err
    assert "valid until" in err
    expiry = int(token.rsplit(".", 2)[1])
    assert 2 * 86400 - 60 <= expiry - time.time() <= 2 * 86400
    assert synapse(["token", "--new-secret"]) == 0
    secret = capsys.readouterr().out.strip()
    assert len(secret) == 43 and secret != NEW
    (tmp_path / "secrets").write_text(f"{secret}\n")
    monkeypatch.delenv("SYNAPSE_GATEWAY_JOIN_SECRETS")
    assert synapse(["token", "--secrets-file", str(tmp_path / "secrets")]) == 0
    assert JoinTokens([secret]).verify(capsys.readouterr().out.strip(), "any") == "*"
    assert synapse(["token"]) == 2
    assert "no join secret to sign with" in capsys.readouterr().err
    assert synapse(["token", "--node", "not a node id"]) == 2
