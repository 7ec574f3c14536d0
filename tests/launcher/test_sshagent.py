"""Keys held by a real ``ssh-agent`` sign Pydra's AUTH message; keys with a passphrase load from a file or a terminal.

The launcher-level tests (a launch across three agents signed by ssh-agent,
by a passphrase file and at a terminal prompt) are in test_launch_keys.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pydra.comm.aio import open_channel, serve_channel
from pydra.comm.channel import AuthenticationError
from pydra.launcher import keys, sshagent
from pydra.launcher.identity import load_identity
from pydra.strictmodes import StrictModeError
from sshagentkit import needs_openssh, ssh_agent, ssh_keygen  # noqa: F401 (ssh_agent is a fixture)

pytestmark = needs_openssh


@pytest.fixture(autouse=True)
def no_inherited_agent(monkeypatch, tmp_path):
    """Neither the developer's ssh-agent nor ~/.pydra takes part."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("PYDRA_HOME", str(tmp_path / "home"))


def handshake(client_identity, server_key: Ed25519PrivateKey) -> bytes:
    """A channel over loopback TCP, the client proving itself with *client_identity*: the key the server saw."""

    async def run() -> bytes:
        seen = asyncio.get_running_loop().create_future()

        async def handler(channel) -> None:
            seen.set_result(channel.peer_key)
            await channel.send_json({"type": "pong"})

        server = await serve_channel("127.0.0.1", 0, handler, identity=server_key, purpose="launch",
                                     authorize_client=lambda key, address: None)
        async with server:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            channel = await open_channel(reader, writer, identity=client_identity, purpose="launch",
                                         verify_server=lambda key: None)
            async with channel:
                assert (await channel.recv_json()) == {"type": "pong"}
            return await asyncio.wait_for(seen, 10)

    return asyncio.run(run())


def test_agent_lists_and_signs_with_an_ssh_keygen_key(ssh_agent, tmp_path):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice@laptop")
    ssh_agent.add(path)
    held = sshagent.agent_keys(ssh_agent.socket)
    assert [key.comment for key in held] == ["alice@laptop"]
    private = keys.load_private_key(path)
    assert keys.public_key_bytes(held[0].public_key()) == keys.public_key_bytes(private)
    # Ed25519 is deterministic: the agent's signature is the one the key itself makes.
    assert held[0].sign(b"pydra/1 initiator auth" + bytes(32)) == private.sign(b"pydra/1 initiator auth" + bytes(32))


def test_an_agent_key_completes_a_handshake(ssh_agent, tmp_path):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice@laptop", passphrase="correct horse")
    ssh_agent.add(path, passphrase="correct horse")
    (held,) = sshagent.agent_keys(ssh_agent.socket)
    assert handshake(held, Ed25519PrivateKey.generate()) == keys.public_key_bytes(held.public_key())


def test_a_key_the_agent_does_not_hold_fails_with_one_line(ssh_agent):
    stranger = sshagent.AgentKey(ssh_agent.socket, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(AuthenticationError, match="ssh-agent cannot sign with SHA256:.*refused the request"):
        stranger.sign(b"data")


def test_no_agent_at_the_socket(tmp_path):
    with pytest.raises(sshagent.AgentError, match="cannot use ssh-agent at"):
        sshagent.agent_keys(str(tmp_path / "nothing"))


def test_the_lender_signs_as_its_key_for_its_user():
    key = Ed25519PrivateKey.generate()
    with sshagent.KeyLender(key) as lender:
        assert oct(os.stat(os.path.dirname(lender.path)).st_mode & 0o777) == "0o700"
        (lent,) = sshagent.agent_keys(lender.path)
        assert lent.sign(b"abc") == key.sign(b"abc")
        other = sshagent.AgentKey(lender.path, Ed25519PrivateKey.generate().public_key())
        with pytest.raises(AuthenticationError, match="refused the request"):
            other.sign(b"abc")
    assert not os.path.exists(lender.path)


def test_load_identity_prefers_the_agent_for_a_locked_key(ssh_agent, tmp_path, monkeypatch):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice@laptop", passphrase="pw")
    ssh_agent.add(path, passphrase="pw")
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent.socket)
    identity = load_identity(path)
    assert isinstance(identity, sshagent.AgentKey)
    pub = load_identity(Path(f"{path}.pub"))  # the public half alone names the agent's key
    assert keys.public_key_bytes(pub.public_key()) == keys.public_key_bytes(identity.public_key())


def test_no_key_file_means_the_agents_first_key(ssh_agent, tmp_path, monkeypatch):
    path = ssh_keygen(tmp_path / "ssh_key", "from-ssh")
    ssh_agent.add(path)
    path.unlink()  # no key file on disk at all
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent.socket)
    identity = load_identity(None)
    assert isinstance(identity, sshagent.AgentKey) and identity.comment == "from-ssh"
    with pytest.raises(FileNotFoundError):  # a path given explicitly must exist
        load_identity(tmp_path / "missing")


def test_passphrase_file(tmp_path):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice", passphrase="s3cret words")
    secret = tmp_path / "passphrase"
    secret.write_text("s3cret words\n")
    secret.chmod(0o600)
    assert isinstance(load_identity(path, secret), Ed25519PrivateKey)
    secret.chmod(0o644)
    with pytest.raises(StrictModeError, match=f"refusing {secret}: readable by"):
        load_identity(path, secret)
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    with pytest.raises(keys.WrongPassphrase):
        load_identity(path, secret)


def test_a_locked_key_without_a_way_to_unlock_it_says_what_to_do(tmp_path, monkeypatch):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice", passphrase="pw")
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    with pytest.raises(keys.KeyFileError) as raised:
        load_identity(path)
    message = str(raised.value)
    assert "protected by a passphrase" in message and "--passphrase-file" in message and "ssh-add" in message
    assert "\n" not in message


def test_a_stale_agent_socket_is_named_but_does_not_stop_the_other_ways(tmp_path, monkeypatch):
    path = ssh_keygen(tmp_path / "id_ed25519", "alice", passphrase="pw")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "gone"))
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    with pytest.raises(keys.KeyFileError, match=r"ssh-add it to ssh-agent \(cannot use ssh-agent at .*gone"):
        load_identity(path)
    secret = tmp_path / "passphrase"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    assert isinstance(load_identity(path, secret), Ed25519PrivateKey)
