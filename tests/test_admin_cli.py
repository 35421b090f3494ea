"""`kaizen admin`: an operator's terminal view of a running server."""

from __future__ import annotations

from kaizen.cli import main
from tests.conftest import ask, publish_random_adapter, wait_until


def test_admin_commands_against_a_running_server(
    server, stubs, registry, tiny_model, api_key, monkeypatch, capsys
):
    target = ["admin", "--target", f"127.0.0.1:{server.port}"]
    monkeypatch.delenv("KAIZEN_API_KEY", raising=False)
    assert main([*target, "versions"]) == 1  # no credential
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("KAIZEN_API_KEY", api_key)

    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: server.engine.version == v1, what="serving v1")
    assert main([*target, "info"]) == 0
    out = capsys.readouterr().out
    assert "serving     v1 since" in out and "swaps       1" in out
    assert main([*target, "versions"]) == 0
    out = capsys.readouterr().out
    assert "v0        retired" in out and "v1        serving" in out

    assert main([*target, "rollback", v1, "--reason", "users complain"]) == 0
    assert "v1: rolled_back (users complain)" in capsys.readouterr().out
    assert server.engine.version == "v0"
    assert main([*target, "promote", "v9"]) == 1
    assert "INVALID_ARGUMENT version: v9" in capsys.readouterr().err

    stubs.chat.Generate(ask(user_id="zed"))
    assert main([*target, "forget", "--user", "zed"]) == 0
    assert "forgot 'zed': 1 answers and 0 feedback events deleted" in capsys.readouterr().out
    assert main([*target, "--key-file", "/nonexistent", "info"]) == 2
