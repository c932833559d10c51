"""The cluster's Ray token as raylm handles it: joining takes it from ~/.ray/auth_token or
$RAY_AUTH_TOKEN_PATH and turns token mode on; a token file others can read is made private."""

from __future__ import annotations

import os
import stat

import pytest

from raylm import cluster
from raylm.errors import InputError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_cluster_token_is_0600_in_a_0700_folder(home):
    os.umask(0o022)
    cluster.ensure_cluster_token()
    token = home / ".ray" / "auth_token"
    assert len(token.read_text()) == 64 and mode(token) == 0o600 and mode(home / ".ray") == 0o700


def test_a_token_others_can_read_is_made_private(home, capsys):
    (home / ".ray").mkdir(mode=0o755)
    token = home / ".ray" / "auth_token"
    token.write_text("t" * 64)
    token.chmod(0o644)
    cluster.ensure_cluster_token()
    assert token.read_text() == "t" * 64, "an existing token is kept (the cluster uses it)"
    assert mode(token) == 0o600 and mode(home / ".ray") == 0o700


def test_a_token_that_cannot_be_made_private_is_refused_saying_how(home, monkeypatch):
    token = home / "shared_token"
    token.write_text("t" * 64)
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))

    def refuse(self, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(type(token), "chmod", refuse)
    with pytest.raises(InputError, match=f"chmod 600 {token}"):
        cluster.use_cluster_token("10.0.0.1:6379")


def test_joining_turns_token_mode_on_with_the_token_file(home, monkeypatch):
    token = home / "cluster.token"
    token.write_text("t" * 64)
    token.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    calls = []
    monkeypatch.setattr("ray._private.authentication.authentication_token_setup._enable_token_auth",
                        lambda: calls.append(os.environ.get("RAY_AUTH_TOKEN_PATH")))
    cluster.use_cluster_token("10.0.0.1:6379")
    assert calls == [str(token)], "token mode is set before ray.init (Ray itself never does for an address)"


def test_joining_without_a_token_names_where_it_looked(home):
    with pytest.raises(InputError, match=r"\.ray/auth_token.*RAY_AUTH_TOKEN_PATH"):
        cluster.use_cluster_token("10.0.0.1:6379")
