"""Reliability: security basics for Unix sockets (cross-connection isolation
is tests/test_reliability_integrity.py::test_no_bytes_cross_connections...)."""
from __future__ import annotations

import os
import socket
import stat

import pytest

import netpoll


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("mode", [None, 0o600, 0o660, 0o700])
def test_unix_socket_file_mode(tmp_path, mode):
    path = str(tmp_path / "s.sock")
    old = os.umask(0)                     # a permissive umask must not widen it
    try:
        kw = {} if mode is None else {"mode": mode}
        lst = netpoll.create_listener("unix", path, **kw)
    finally:
        os.umask(old)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _mode(path) == (0o600 if mode is None else mode)
    finally:
        lst.close()
    assert not os.path.lexists(path), "close() did not remove the socket file"


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                             # stale: file left, nobody listening
    with netpoll.create_listener("unix", path) as lst:
        c = netpoll.dial_connection("unix", lst.addr, timeout=2)
        c.close()


def test_symlink_at_the_path_is_never_followed(tmp_path):
    target_dir = tmp_path / "victim"
    target_dir.mkdir()
    victim = str(target_dir / "real.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(victim)                        # a socket file the attacker points at
    s.close()
    regular = target_dir / "data"
    regular.write_bytes(b"keep")
    for target in (victim, str(regular)):
        link = str(tmp_path / "s.sock")
        os.symlink(target, link)
        with pytest.raises(FileExistsError):
            netpoll.create_listener("unix", link)
        assert os.path.islink(link), "the symlink was removed or replaced"
        assert os.path.lexists(target), "the symlink's target was removed"
        os.unlink(link)
    assert regular.read_bytes() == b"keep"


def test_close_does_not_follow_a_symlink_swapped_in(tmp_path):
    path = str(tmp_path / "s.sock")
    victim = tmp_path / "victim.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(victim))
    s.close()
    lst = netpoll.create_listener("unix", path)
    os.unlink(path)
    os.symlink(str(victim), path)         # swapped for a symlink while serving
    lst.close()
    assert os.path.lexists(str(victim)), "close() followed the symlink"


def test_regular_file_at_the_path_is_an_error(tmp_path):
    path = tmp_path / "s.sock"
    path.write_bytes(b"not a socket")
    with pytest.raises(FileExistsError):
        netpoll.create_listener("unix", str(path))
    assert path.read_bytes() == b"not a socket"
