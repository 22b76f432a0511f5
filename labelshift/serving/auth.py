"""Who may change the served priors (``PUT /v1/priors``): a bearer token when one is configured (compared in
constant time); without one, only a server bound to loopback, asked from loopback."""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a mutating request is refused: HTTP ``status`` (401 no credentials, 403 wrong or not allowed)."""

    status: int
    reason: str
    detail: str


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address; None or a name is not."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_mutation(token: str | None, authorization: str | None, bind_host: str | None,
                   client_host: str | None) -> Refusal | None:
    """None when the request may change state, else the :class:`Refusal`.

    ``token``: the configured token (None: none); ``authorization``: the request's ``Authorization`` header;
    ``bind_host``: the address the HTTP proxy binds (None: unknown, treated as not loopback).
    """
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return Refusal(401, "unauthorized", "PUT /v1/priors needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return Refusal(403, "forbidden", "wrong bearer token")
        return None
    if not is_loopback(bind_host):
        return Refusal(403, "forbidden", f"the server binds {bind_host or 'an unknown address'}, not loopback only: "
                                         "set LABELSHIFT_SERVE_TOKEN to allow PUT /v1/priors")
    if not is_loopback(client_host):
        return Refusal(403, "forbidden", f"PUT /v1/priors from {client_host} refused: without a token only "
                                         "loopback clients may change priors")
    return None
