"""Who may talk to ``multitask serve``: where it listens, which Host names it answers, and its bearer token.

- :func:`check_listen` refuses, before anything loads, a port outside 1..65535 and a non-loopback address
  (``--host 0.0.0.0``) without ``--token`` or an explicit ``--insecure-no-token``: patient images must not be
  served to a network by accident.
- :class:`Guard` (ASGI middleware) answers 400 to a request whose ``Host`` header names no trusted host, which
  stops DNS rebinding (a web page on ``evil.example`` whose name is made to resolve to 127.0.0.1 still sends
  ``Host: evil.example``), and 401 to a request without the bearer token when there is one. The page itself
  (``GET /``, static, no data) needs no token: it asks for it, or reads it from the address (``#token=...``,
  which browsers never send to the server).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket

from multitask.errors import ConfigError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
MIN_TOKEN_CHARS = 16
PUBLIC_PATHS = ("/",)  # the page: static, carries no data, asks for the token itself


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only listens on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def check_listen(host: str, port: int, *, token: str | None = None, insecure_no_token: bool = False) -> None:
    """ConfigError, with what to do, for a listening address that must not be used as given."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    if token is not None and insecure_no_token:
        raise ConfigError("give either --token or --insecure-no-token, not both")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"--token must have at least {MIN_TOKEN_CHARS} characters (a random one: python -c "
                          "\"import secrets; print(secrets.token_urlsafe())\")")
    if not is_loopback(host) and token is None and not insecure_no_token:
        raise ConfigError(f"--host {host} serves the images sent to it to the network, with no login: add --token "
                          "TOKEN (clients then send 'Authorization: Bearer TOKEN'), or --insecure-no-token if "
                          "the network is yours alone")


def trusted_hosts(host: str, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The Host names a server listening on ``host`` answers: this machine's loopback names, ``host`` itself, and
    ``extra`` (``--allowed-host``; ``*`` allows any). Listening on every interface adds the machine's own name
    and addresses, which is what clients on the network type."""
    names = [*LOOPBACK_NAMES, host, *extra]
    if host in WILDCARDS:
        names += [socket.gethostname(), socket.getfqdn()]
        with contextlib.suppress(OSError):  # no resolvable name: the loopback names and --allowed-host still work
            names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    return list(dict.fromkeys(_normal(name) for name in names if name and name not in WILDCARDS))


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``, ``Example.org.:80`` ->
    ``example.org``."""
    header = header.strip()
    if header.startswith("["):
        return _normal(header[1:].split("]", 1)[0])
    name, _, port = header.rpartition(":")
    return _normal(name if name and port.isdigit() else header)


def _normal(name: str) -> str:
    return name.strip("[]").rstrip(".").lower()


class Guard:
    """ASGI middleware: the trusted-host check, then the bearer token (when there is one), before any route."""

    def __init__(self, app, *, allowed_hosts: list[str] | tuple[str, ...], token: str | None = None):
        self.app, self.token = app, token
        self.allowed = {_normal(name) for name in allowed_hosts}
        self.any_host = "*" in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the app has no websocket routes
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        name = host_name(headers.get("host", ""))
        if not self.any_host and name not in self.allowed:
            shown = ", ".join(sorted(self.allowed))
            return await _answer(send, 400, f"untrusted Host header {name!r}: this server answers to {shown} "
                                            "(add a name with multitask serve --allowed-host NAME)")
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self._authorised(headers):
            return await _answer(send, 401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
                                            "with the token multitask serve was started with",
                                 [(b"www-authenticate", b'Bearer realm="multitask"')])
        return await self.app(scope, receive, send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())


async def _answer(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
