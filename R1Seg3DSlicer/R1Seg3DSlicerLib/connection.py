"""The panel's side of the contract with an R1Seg3D server: versions, refusals and which URLs may be used.

The contract (kept by `r1seg serve`):
- `GET /health` carries `"version"` (the r1seg3d package version) and `"api"` (an integer, API_VERSION);
- every request carries the header `X-R1Seg3D-API: <API_VERSION>`; a server that speaks another API answers
  409 `{"error": "version_mismatch", "message": ...}`;
- an upload above the server's limit is answered 413 with a JSON message.

PanelClient is r1seg_core's client with that contract added as a urllib handler, so each reply is read in one
place: a version mismatch and a too-large upload become their own errors, which the panel names plainly and
never takes for a dead server (a 413 must not make the panel start another server). Standard library only.
"""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import r1seg_core
from r1seg_core.errors import InvalidInputError
from r1seg_core.server import protocol
from r1seg_core.server.client import Client, ServerError

from .i18n import tr as _

API_VERSION, API_HEADER, ERROR_VERSION_MISMATCH = protocol.API_VERSION, protocol.API_HEADER, protocol.ERROR_VERSION
HTTP_CONFLICT, HTTP_TOO_LARGE = 409, 413


class VersionMismatch(ServerError):
    """The server speaks another API version than this panel; the message names both versions."""


class UploadTooLarge(ServerError):
    """The server refused the CT as larger than it accepts (HTTP 413); the server is fine."""


def panel_version() -> str:
    return f"R1Seg3D {r1seg_core.__version__} (API {API_VERSION})"


def _server_version(version, api) -> str:
    return _("R1Seg3D {version} (API {api})").format(version=version or _("unknown"), api=api if api is not None else "1")


def version_mismatch(url: str, server_version: str, detail: str = "") -> VersionMismatch:
    message = _("The R1Seg3D server at {url} is {server}; this panel is {panel}. Use the same R1Seg3D version on"
                " both sides (update the extension or the server).").format(url=url, server=server_version,
                                                                           panel=panel_version())
    return VersionMismatch(f"{message} {detail}".strip(), HTTP_CONFLICT, ERROR_VERSION_MISMATCH)


def check_health(client: Client) -> dict:
    """The server's /health, after checking that it speaks this panel's API (VersionMismatch otherwise)."""
    health = client.health()
    if health.get("api") != API_VERSION:
        raise version_mismatch(client.url, _server_version(health.get("version"), health.get("api")))
    return health


def check_server_url(url: str, allow_insecure: bool) -> None:
    """A server on another machine must be reached over https (the CT and the token cross the network), unless
    the user said that network is trusted. Raises InvalidInputError naming the fix."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(_("The server URL {url!r} is not an http:// or https:// address.").format(url=url))
    if parts.scheme == "http" and not protocol.is_loopback(parts.hostname) and not allow_insecure:
        raise InvalidInputError(_(
            "The server URL {url} is plain http to another machine: the CT and the server's token would cross the"
            " network unencrypted. Use https://, or tick 'Insecure connection (trusted network only)' in Advanced"
            " if this network is private and trusted.").format(url=url))


class _ContractHandler(urllib.request.BaseHandler):
    """Turns the contract's refusals into their own errors (r1seg_core's client sends the API header itself)."""

    handler_order = 999   # before urllib's HTTPErrorProcessor (1000), which would make them plain HTTPErrors

    def __init__(self, url: str):
        self._url = url

    def http_response(self, request, response):
        if response.status not in (HTTP_CONFLICT, HTTP_TOO_LARGE):
            return response
        body = response.read()
        try:
            reply = json.loads(body)
        except ValueError:
            reply = {}
        reply = reply if isinstance(reply, dict) else {}
        detail = str(reply.get("message") or reply.get("detail") or body[:200].decode("utf-8", "replace"))
        if response.status == HTTP_TOO_LARGE:
            raise UploadTooLarge(_("The R1Seg3D server at {url} refused the CT as too large: {detail}").format(
                url=self._url, detail=detail), HTTP_TOO_LARGE, reply.get("error"))
        if reply.get("error") == ERROR_VERSION_MISMATCH:
            raise version_mismatch(self._url, _server_version(reply.get("version"), reply.get("api")), detail)
        # Another conflict (e.g. a result asked for too early): the client reads it as before.
        raise urllib.error.HTTPError(request.full_url, response.status, response.reason, response.headers,
                                     io.BytesIO(body))

    https_response = http_response


class PanelClient(Client):
    """r1seg_core's client plus the contract above."""

    def __init__(self, url: str, token: str | None = None):
        super().__init__(url, token)
        self._opener.add_handler(_ContractHandler(self.url))


def remote_client(url: str, token: str, allow_insecure: bool) -> PanelClient:
    """A client of a server the user named, after the URL policy (check_server_url)."""
    check_server_url(url, allow_insecure)
    return PanelClient(url, token or None)


def connection_report(client: PanelClient) -> str:
    """One line for the panel: who answers at the client's URL and whether this panel can use it. Raises the
    server's errors (unreachable, refused token, VersionMismatch)."""
    health = check_health(client)
    return _("Connected to {server} at {url}; model: {state}.").format(
        server=_server_version(health.get("version"), health.get("api")), url=client.url, state=health.get("model"))
