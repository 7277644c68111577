"""Requests to this machine never go through a proxy the environment names.

A proxy elsewhere cannot reach this machine's loopback, where the servers reflectagent starts listen (the
embedded one, ``reflectagent serve``): sent there, a request for ``127.0.0.1`` reaches the proxy's own host, or
nothing. So every client of reflectagent's (the step path's aiohttp client, the httpx requests for
``/v1/models`` and ``/tokenize``, the readiness wait of a starting server) asks :func:`bypasses_proxy` first,
and goes straight to a loopback host whatever ``http_proxy``, ``https_proxy`` or ``all_proxy`` say; a SOCKS
``all_proxy`` (whose httpx transport needs the ``socksio`` package) never stops a local server from being asked.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Any


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: ``localhost`` (and its subdomains, RFC 6761), a loopback address
    (``127.0.0.0/8``, ``::1``, an IPv4-mapped one), or the unspecified address a server may be bound to
    (``0.0.0.0``, ``::``, which a client connecting to reaches this machine)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not the address
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback or address.is_unspecified


def bypasses_proxy(url: str) -> bool:
    """Whether a request for ``url`` goes straight to its host, never through the environment's proxy: one on
    this machine (:func:`is_loopback`)."""
    host = urllib.parse.urlsplit(url).hostname
    return bool(host) and is_loopback(host)


def httpx_options(url: str) -> dict[str, Any]:
    """What an httpx request or client for ``url`` is given so that :func:`bypasses_proxy` holds: for a host on
    this machine, ``trust_env=False`` (httpx then reads no proxy, nor ``~/.netrc`` or ``SSL_CERT_FILE``, from the
    environment); for any other host, nothing (httpx reads the environment as it always does)."""
    return {"trust_env": False} if bypasses_proxy(url) else {}
