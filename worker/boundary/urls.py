"""Which image URLs the worker may fetch, and which addresses it may connect to (issue #16).

Two checks, both saying "no" by default:

- :class:`HostAllowlist` reads a URL as the fetcher will (yarl, the parser aiohttp connects
  with, so the host checked is the host connected to) and allows only ``https`` to a host the
  operator listed in ``llm.remote_images.hosts``: an exact name (``images.example.com``, port
  443) or a suffix pattern (``*.example.com``: any name under example.com, not example.com
  itself), either with ``:PORT`` for another port. No IP literal, no user info, no other scheme.
- :func:`public_address` is what every address a listed name resolves to must be: globally
  routable unicast. Loopback, private (RFC 1918, unique-local), link-local (and with it the
  cloud metadata address 169.254.169.254), CGNAT (100.64.0.0/10), multicast, reserved,
  unspecified, benchmarking and documentation ranges are refused, IPv4-mapped IPv6 addresses
  (``::ffff:127.0.0.1``) by the IPv4 address they map, IPv6 translation prefixes (NAT64,
  6to4, Teredo) outright.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The metadata services of the clouds: all are inside ranges refused anyway (link-local,
# unique-local, CGNAT); named so a test and a reader can see each one is.
METADATA_ADDRESSES = (
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, Oracle, OpenStack
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
)
# Prefixes that embed an IPv4 address the packet is translated to: a relay or gateway would
# carry the connection to an address this check never saw.
_TRANSLATED = (
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix
    ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64, local use
    ipaddress.ip_network("2002::/16"),  # 6to4
    ipaddress.ip_network("2001::/32"),  # Teredo
)
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST_ENTRY = re.compile(rf"^(\*\.)?({_LABEL}(?:\.{_LABEL})+)(?::([0-9]{{1,5}}))?$")
_MAX_URL_CHARS = 2048
HTTPS_PORT = 443


def public_address(address: IPAddress) -> bool:
    """True only for a globally routable unicast address the worker may connect to."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return public_address(address.ipv4_mapped)
        if any(address in network for network in _TRANSLATED):
            return False
    refused = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return address.is_global and not refused and address not in METADATA_ADDRESSES


@dataclass(frozen=True)
class HostEntry:
    """One ``llm.remote_images.hosts`` entry: a name (or the suffix of ``*.``) and its port."""

    name: str
    port: int
    suffix: bool

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        return host.endswith("." + self.name) if self.suffix else host == self.name


def parse_host_entry(entry: str) -> HostEntry:
    """A ``hosts`` entry, or ValueError saying what an entry looks like."""
    match = _HOST_ENTRY.match(entry)
    if match is None:
        raise ValueError(
            f"{entry!r}: expected a lower-case host name (images.example.com) or a suffix pattern "
            "(*.example.com), optionally with :PORT; IDN names in their xn-- form"
        )
    wildcard, name, port = match.groups()
    if all(label.isdigit() for label in name.split(".")):
        raise ValueError(f"{entry!r}: an IP address; the worker fetches from host names only")
    number = int(port) if port else HTTPS_PORT
    if not 0 < number < 65536:
        raise ValueError(f"{entry!r}: port {number} is out of range 1-65535")
    return HostEntry(name=name, port=number, suffix=wildcard is not None)


class HostAllowlist:
    """The hosts of ``llm.remote_images.hosts``; :meth:`refusal` says why a URL is not fetched."""

    def __init__(self, entries: Sequence[str]):
        self.entries = tuple(parse_host_entry(entry) for entry in entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def refusal(self, url: str | URL) -> str | None:
        """None when ``url`` may be fetched, else the reason (quoting at most the host)."""
        if len(str(url)) > _MAX_URL_CHARS:
            return f"a URL longer than {_MAX_URL_CHARS} characters"
        try:
            parsed = URL(url)
        except ValueError:
            return "not a valid URL"
        if parsed.scheme != "https":
            scheme = f"{parsed.scheme}: " if parsed.scheme else "a relative "
            return f"only https URLs of allowed hosts are fetched, {scheme}URL was sent"
        host = parsed.raw_host
        if not parsed.is_absolute() or not host:
            return "an https URL without a host"
        if parsed.user is not None or parsed.password is not None:
            return "a URL with user info is not fetched"
        port = parsed.port if parsed.port is not None else HTTPS_PORT
        if not any(entry.matches(host, port) for entry in self.entries):
            where = host if parsed.explicit_port is None else f"{host}:{parsed.explicit_port}"
            return f"host {where[:80]!r} is not in llm.remote_images.hosts"
        return None
