"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under the interpreter, which triton reads when ``@triton.jit``
runs, i.e. when a kernel module is first imported; kzoo imports kernel modules lazily, so setting it
here, before any test imports them, is enough.

Tests never touch the network: every connection to a host other than this machine fails (a
session-wide guard, checked by ``tests/test_network.py``), and ``HF_HUB_OFFLINE=1`` is set before
anything imports huggingface_hub, for this process and the subprocesses tests start. Hub downloads
are tested against cache folders the tests build.

Inductor's on-disk cache is keyed on the traced graph, not on a custom op's fake implementation, so
code compiled against an older kzoo (say, another stats shape) would be reused; each test run
compiles into a cache of its own, as on a fresh machine.
"""
import atexit
import ipaddress
import os
import shutil
import socket
import tempfile

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kzoo-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; 0 for empty tensors."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def poison(monkeypatch):
    """Fill every floating tensor made by torch.empty / empty_like with NaN, to catch unwritten outputs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor):
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


class NetworkUsed(OSError):
    """A test tried to reach another machine."""


def _is_local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Connections and name lookups for anything but this machine fail for the whole run (local
    sockets stay: torch.distributed's rendezvous and the tests' own servers use them)."""
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(address):
        raise NetworkUsed(f"tests must not use the network (tried {address})")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            refuse(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host.decode() if isinstance(host, bytes) else host):
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        yield
