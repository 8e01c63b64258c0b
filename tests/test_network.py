"""The suite-wide guard of ``conftest.py``: no test reaches another machine."""
import os
import socket

import pytest

from tests.conftest import NetworkUsed


@pytest.mark.parametrize("address", [("huggingface.co", 443), ("8.8.8.8", 53), ("2001:4860:4860::8888", 53)])
def test_connections_to_other_machines_fail(address):
    with pytest.raises(NetworkUsed, match="tests must not use the network"):
        socket.create_connection(address, timeout=1)


def test_local_connections_still_work():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=5):
            connection, _ = server.accept()
            connection.close()


def test_subprocesses_inherit_offline_mode():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
