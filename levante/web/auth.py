"""Who is using the web app: a member signed in with an API key (a session cookie), an API client
sending the key as a bearer token, or — on a server with no keys at all — the local workspace.

The session cookie is HttpOnly and SameSite=Strict; every state change made with it must also
carry the session's CSRF token in a header (a page of another site can neither read the token nor
set the header). Bearer requests carry no ambient credential, so they need no token. A local
workspace (no keys, loopback by default) is one team whose members name themselves in the page;
its CSRF token is kept in the store so open pages keep working across a restart. Once any key
exists, the web app requires sign-in — the same rule as the API."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request, Response

from levante.api.errors import APIError
from levante.api.server import ADMIN, Server
from levante.errors import LevanteError
from levante.metering.ledger import SERVER_TEAM, Key
from levante.web.store import SESSION_SECONDS, Store, digest

COOKIE = "levante_session"
CSRF_HEADER = "x-csrf-token"
LOCAL_TEAM = "local"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Member:
    name: str | None  # None in the local workspace: the page names its member on each post
    team: str
    admin: bool
    key: Key | None  # whom the ledger bills; None in the local workspace
    csrf: str | None  # None for bearer requests

    def public(self) -> dict[str, object]:
        return {"name": self.name, "team": self.team, "admin": self.admin}

    def sees(self, team: str) -> bool:
        return self.admin or team == self.team


def keys_required(server: Server) -> bool:
    return server.config.api_key is not None or (server.ledger is not None and server.ledger.has_keys())


def _member(key: Key, csrf: str | None) -> Member:
    team = key.team if key.team is not None else SERVER_TEAM  # the single --api-key has no ledger team
    return Member(key.name, team, key.admin, key, csrf)


def signed_in(server: Server, store: Store, request: Request) -> Member | None:
    """The member behind this request, or None when sign-in is needed and missing."""
    if not keys_required(server):
        return Member(None, LOCAL_TEAM, True, None, store.secret("local_csrf"))
    if request.headers.get("authorization"):
        key = server.authorize(request)  # 401 for a wrong or revoked key
        return _member(key, None) if key is not None else None
    token = request.cookies.get(COOKIE)
    session = store.session(token) if token else None
    if session is None:
        return None
    if session.key_digest is not None:
        single = server.config.api_key
        if single is None or not hmac.compare_digest(session.key_digest, digest(single)):
            return None  # the server restarted with another --api-key
        return _member(ADMIN, session.csrf)
    if server.ledger is None or session.key_id is None:
        return None
    try:
        key = server.ledger.key(session.key_id)
    except LevanteError:  # the key was deleted from the ledger
        return None
    return None if key.revoked is not None else _member(key, session.csrf)


def require(server: Server, store: Store, request: Request) -> Member:
    """The signed-in member; 401 if none, 403 for a state change without the session's CSRF token."""
    member = signed_in(server, store, request)
    if member is None:
        raise APIError(401, "sign in with an API key first", code="not_signed_in")
    if request.method not in SAFE_METHODS and member.csrf is not None:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), member.csrf.encode()):
            raise APIError(403, "missing or wrong X-CSRF-Token header", param=CSRF_HEADER, code="csrf")
    return member


def sign_in(server: Server, store: Store, secret: str, response: Response, secure: bool) -> Member:
    """Checks an API key as the API does and opens a session for it (cookie set on `response`)."""
    if not keys_required(server):
        raise APIError(400, "this server has no API keys: the workspace is open without signing in")
    if not secret:
        raise APIError(400, "key: give the API key to sign in with", param="key")
    single = server.config.api_key
    if single is not None and hmac.compare_digest(secret.encode(), single.encode()):
        key, session = ADMIN, store.open_session(None, digest(single))
    else:
        found = server.ledger.authenticate(secret) if server.ledger is not None else None
        if found is None:
            raise APIError(401, "Incorrect API key provided", param="key", code="invalid_api_key")
        if found.revoked is not None:
            raise APIError(
                401, f"The API key {found.hint}… has been revoked", param="key", code="invalid_api_key"
            )
        key, session = found, store.open_session(found.id, None)
    token, csrf = session
    response.set_cookie(
        COOKIE, token, max_age=SESSION_SECONDS, httponly=True, samesite="strict", secure=secure, path="/"
    )
    return _member(key, csrf)


def sign_out(store: Store, request: Request, response: Response) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        store.close_session(token)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
