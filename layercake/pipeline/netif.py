"""Which network interface owns an address, and gloo bound to it for this process.

Gloo's default device binds to whatever this machine's hostname resolves to; on many Linux hosts
that is a loopback address (``127.0.1.1`` in /etc/hosts), which the other hosts then try to reach
and cannot. A node's topology address names the interface instead: it is found here by address
(IPv4 through ``SIOCGIFADDR``, IPv6 through ``/proc/net/if_inet6``), without psutil.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from layercake.errors import LayercakeError

SIOCGIFADDR = 0x8915
GLOO_ENV = "GLOO_SOCKET_IFNAME"


def _ipv4(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on this interface
            return None
    return socket.inet_ntoa(res[20:24])


def _ipv6() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    p = Path("/proc/net/if_inet6")
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        f = line.split()
        if len(f) >= 6:
            out.setdefault(f[5], []).append(str(ipaddress.IPv6Address(bytes.fromhex(f[0]))))
    return out


def addresses() -> dict[str, list[str]]:
    """Interface name -> its addresses (IPv4 primary address, then IPv6)."""
    v6 = _ipv6()
    out: dict[str, list[str]] = {}
    for _, name in socket.if_nameindex():
        v4 = _ipv4(name)
        out[name] = ([v4] if v4 else []) + v6.get(name, [])
    return out


def resolve(host: str) -> str:
    """``host`` as an IP address (a name is looked up)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except socket.gaierror:
        raise LayercakeError(f"cannot resolve host {host!r}") from None


def interface_of(host: str) -> str | None:
    """The interface that owns ``host``'s address (None: not an address of this machine)."""
    ip = ipaddress.ip_address(resolve(host))
    table = addresses()
    for name, addrs in table.items():
        if any(ipaddress.ip_address(a.split("%")[0]) == ip for a in addrs):
            return name
    if ip.is_loopback:  # 127.0.0.0/8 all belong to lo, though it lists 127.0.0.1 only
        return next((n for n in table if n == "lo"), None)
    return None


@contextlib.contextmanager
def gloo_interface(interface: str) -> Iterator[None]:
    """Gloo's default device on ``interface`` while a process group is made (gloo reads the
    variable when it builds its device); the process's own setting is restored after."""
    before = os.environ.get(GLOO_ENV)
    os.environ[GLOO_ENV] = interface
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GLOO_ENV, None)
        else:
            os.environ[GLOO_ENV] = before


__all__ = ["addresses", "gloo_interface", "interface_of", "resolve"]
