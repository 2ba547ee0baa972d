"""Which IP addresses an image fetch may connect to: the SSRF rule, kept apart so it is easy to audit.

A URL's host passing --allowed-media-domains is not enough: its DNS may point at 127.0.0.1, a
private network or the cloud metadata service. Every resolved address is judged here before any
connection is made.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# AWS/GCP/Azure (IPv4), AWS (IPv6), Alibaba Cloud. Refused even when private addresses are allowed:
# they hand out the host's credentials, which no image fetch ever needs.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused_address_kind(address: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why fetching from `address` is refused ("loopback", "cloud metadata", ...), or None if allowed.

    Addresses that embed an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) are judged by it too,
    so ::ffff:127.0.0.1 is loopback. Cloud metadata addresses are refused even with allow_private.
    """
    # Embedded IPv4 first: it names the host really reached, and gives the clearer label
    # (::ffff:127.0.0.1 is "loopback", not merely "private").
    candidates: list[IPAddress] = []
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            candidates.append(address.sixtofour)
        if address.teredo is not None:
            candidates.append(address.teredo[1])
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    candidates.append(address)
    for ip in candidates:
        if ip in METADATA_ADDRESSES:
            return "cloud metadata"
    if allow_private:
        return None
    for ip in candidates:
        for kind, hit in (
            ("loopback", ip.is_loopback),
            ("unspecified", ip.is_unspecified),
            ("link-local", ip.is_link_local),
            ("multicast", ip.is_multicast),
            ("reserved", ip.is_reserved),  # before "private": Python counts 240.0.0.0/4 as both
            ("private", ip.is_private),
            ("non-global", not ip.is_global),
        ):
            if hit:
                return kind
    return None
