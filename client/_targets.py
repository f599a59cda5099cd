"""Where a client sends its calls: one server, several, or a DNS name standing for several.

gRPC does the balancing itself. Every channel gets a service config with the ``round_robin``
load-balancing policy (each call goes to the next connected server, not just the first one, as
the default ``pick_first`` would) and client-side health checking (``healthCheckConfig``): each
connection watches the server's ``grpc.health.v1.Health`` and a server that reports
NOT_SERVING (warming up, draining on SIGTERM) gets no new calls until it reports SERVING again.
A server that is not reachable at all is skipped the same way, and retried in the background
with gRPC's reconnect backoff, so a replica that comes back is used again.

The targets gRPC understands:

- one ``host:port``: resolved by gRPC's DNS resolver, re-resolved when connections fail; a name
  with several addresses (a Kubernetes headless Service) is balanced over all of them;
- ``dns:///name:port`` (or any other scheme gRPC knows, such as ``unix:``, ``ipv4:``): as given;
- several servers, as a list or comma-separated (``a:50051,b:50051``): each host is resolved
  once, here, and the set becomes one static ``ipv4:``/``ipv6:`` target; for a set that changes,
  give one DNS name that resolves to all of them instead.

A server without a port gets :data:`DEFAULT_PORT` (50051), not gRPC's default of 443.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PORT",
    "HEALTH_SERVICE",
    "Servers",
    "Target",
    "channel_options",
    "parse_servers",
    "resolve_target",
    "service_config",
    "split_host_port",
]

DEFAULT_PORT = 50051
HEALTH_SERVICE = ""
"""The health service name watched: "" is the whole server (cifar-serve and Triton both report it)."""

Servers = str | Sequence[str]
"""One server, a comma-separated list of them, or a sequence of them."""

_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
_DNS = re.compile(r"^dns:(?://(?P<authority>[^/]*)/)?(?P<name>[^/].*)$")


@dataclass(frozen=True)
class Target:
    """A gRPC channel target and what it stands for."""

    target: str
    """What the channel is opened with."""
    servers: tuple[str, ...]
    """The servers as the caller named them (with default ports filled in)."""
    authority: str | None = None
    """The ``:authority`` (and TLS name) to use when the target itself does not name a host."""

    def __str__(self) -> str:
        return ",".join(self.servers)


def parse_servers(servers: Servers) -> list[str]:
    """The entries of ``servers`` (a list, or a comma-separated string), stripped, none empty."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = [s.strip() for s in items]
    if not out or any(not s for s in out):
        raise ValueError(f"empty server address in {servers!r}; expected HOST[:PORT][,HOST[:PORT]...]")
    return out


def _scheme(entry: str) -> str | None:
    head, sep, _ = entry.partition(":")
    return head.lower() if sep and head.lower() in _SCHEMES else None


def split_host_port(entry: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address, as (host, port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad server address {entry!r}; expected [IPV6]:PORT")
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:  # a host name, or an IPv6 address without brackets (no port)
        host, port_text = entry, ""
    if not host:
        raise ValueError(f"bad server address {entry!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad server address {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _with_port(entry: str) -> str:
    scheme = _scheme(entry)
    if scheme == "dns":
        m = _DNS.match(entry)
        if m is None:
            raise ValueError(f"bad server address {entry!r}; expected dns:///NAME[:PORT]")
        return f"dns://{m['authority'] or ''}/{join_host_port(*split_host_port(m['name']))}"
    if scheme is not None:
        return entry
    return join_host_port(*split_host_port(entry))


def _address_of(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve server {host!r}: {exc.strerror}") from None
    # One address per named server: "localhost" would otherwise count twice (127.0.0.1 and ::1).
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return ipaddress.ip_address(infos[0][4][0])


def resolve_target(servers: Servers) -> Target:
    """The channel target for ``servers``; see the module documentation."""
    entries = [_with_port(e) for e in parse_servers(servers)]
    if len(entries) == 1:
        return Target(entries[0], tuple(entries))
    if any(_scheme(e) for e in entries):
        raise ValueError(
            f"{','.join(entries)}: a target with a scheme (dns:///, unix:, ...) must be the only server; "
            "list several servers as HOST:PORT"
        )
    addresses = []
    for entry in entries:
        host, port = split_host_port(entry)
        addresses.append((_address_of(host, port), port))
    versions = {a.version for a, _ in addresses}
    if len(versions) > 1:
        raise ValueError(f"{','.join(entries)}: servers must be all IPv4 or all IPv6, not a mix")
    scheme = "ipv4" if versions == {4} else "ipv6"
    target = f"{scheme}:" + ",".join(join_host_port(str(a), p) for a, p in addresses)
    return Target(target, tuple(entries), authority=entries[0])


def service_config(health_service: str = HEALTH_SERVICE) -> str:
    """The channel's service config: round_robin over the healthy servers."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": health_service},
        }
    )


def channel_options(target: Target) -> list[tuple[str, str | int]]:
    """The channel arguments that make ``target`` a balanced, health-checked channel."""
    opts: list[tuple[str, str | int]] = [("grpc.service_config", service_config())]
    if target.authority is not None:
        opts.append(("grpc.default_authority", target.authority))
    return opts
