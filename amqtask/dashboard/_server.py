"""The dashboard's HTTP side: routes, and the safety checks every request passes.

* **Host guard** (DNS rebinding): a page of another site that made its own name resolve to
  127.0.0.1 reaches the server with that name in `Host`. Bound to a loopback address, only
  `localhost`, `127.0.0.1` and `[::1]` are accepted; bound to a named host, only that name; bound
  to all addresses (`0.0.0.0`, `::`) any, since `--auth` is then required and a rebinding page
  does not know the password. Refused with 421.
* **Basic auth** (`auth="user:password"`): every request, pages and API, or 401 with
  `WWW-Authenticate`.
* **Write actions** are POST only, with `Content-Type: application/json` and the header
  `X-Amqtask-Action: 1`, which a cross-site form cannot send (403/415 otherwise); under
  `read_only` every one answers 403 `{"error": "read-only"}`.
* **Cross-site requests** to `/api/` are refused (403): a `Sec-Fetch-Site` other than
  `same-origin`/`none`, or an `Origin` other than the dashboard's own. An image or no-cors fetch
  on another site's page would otherwise read dead letters with the browser's cached password.
* **Framing** by another site is refused (`X-Frame-Options`, CSP `frame-ancestors`), so no page
  can overlay the dashboard's confirmations.
* **Errors** are JSON `{"error": ...}`: 400 for bad input, 404 for what the app does not have,
  503 while the broker (or the store, or the management API) cannot be asked or closed a
  channel, 500 (logged) for anything else; the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import aiormq.exceptions
import orjson
import structlog
from aiohttp import web

from amqtask._dead_letters import MoreThanSeen, Selection
from amqtask._exceptions import AmqtaskError, ConnectError, StoreError, TopologyMissing
from amqtask.dashboard._data import Busy, DashboardData, NotFound, parse_since

log = structlog.get_logger("amqtask.dashboard")

DATA: web.AppKey[DashboardData] = web.AppKey("amqtask_dashboard_data", DashboardData)

ACTION_HEADER = "X-Amqtask-Action"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Settings:
    """What the middleware checks: where the server is bound, auth, read-only."""

    def __init__(self, *, host: str, port: int | None, auth: str | None, read_only: bool) -> None:
        self.host = host
        self.port = port
        self.read_only = read_only
        self.auth: tuple[str, str] | None = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("auth must be USER:PASSWORD")
            self.auth = (user, password)

    def host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name, port = _split_host(header)
        if self.port is not None and port is not None and port != self.port:
            return False
        bound = self.host.strip("[]")
        if bound in ANY_ADDRESS:
            return True
        if is_loopback(bound):
            return name.strip("[]") in {n.strip("[]") for n in LOOPBACK_NAMES} or name == bound
        return name.strip("[]").lower() == bound.lower()

    def authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = given.partition(":")
        # Both compared, in constant time: no early exit that times which one was wrong.
        good_user = hmac.compare_digest(user.encode(), self.auth[0].encode())
        good_password = hmac.compare_digest(password.encode(), self.auth[1].encode())
        return good_user and good_password


SETTINGS = web.AppKey("amqtask_dashboard_settings", Settings)


def _split_host(header: str) -> tuple[str, int | None]:
    if header.startswith("["):
        name, _, rest = header.partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return name + "]", int(port) if port.isdigit() else None
    name, _, port = header.rpartition(":") if header.count(":") == 1 else (header, "", "")
    return name, int(port) if port.isdigit() else None


def is_loopback(host: str) -> bool:
    """A loopback address (127.0.0.0/8, ::1), or the name `localhost`; no other name is."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )


def json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


@web.middleware
async def safety(request: web.Request, handler: _Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not settings.host_allowed(request.headers.get("Host")):
        return error(421, "this server does not answer to that host name")
    if not settings.authorized(request.headers.get("Authorization")):
        return error(
            401, "authentication required", **{"WWW-Authenticate": 'Basic realm="amqtask"'}
        )
    if request.path.startswith("/api/") and not _same_origin(request):
        return error(403, "cross-site requests to the API are refused")
    if request.method == "POST":
        if settings.read_only:
            return error(403, "read-only")
        if request.headers.get(ACTION_HEADER) != "1":
            return error(403, f"write actions need the header {ACTION_HEADER}: 1")
        if request.content_type != "application/json":
            return error(415, "write actions take Content-Type: application/json")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except NotFound as exc:
        return error(404, str(exc))
    except Busy as exc:
        return error(429, str(exc), **{"Retry-After": "1"})
    except TopologyMissing as exc:
        return error(404, str(exc))
    except (ConnectError, ConnectionError, OSError, TimeoutError) as exc:
        return error(503, f"broker unreachable: {_one_line(exc)}")
    except StoreError as exc:
        return error(503, f"task store: {_one_line(exc)}")
    except AmqtaskError as exc:
        return error(502, _one_line(exc))
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        # A channel the broker closed (refused, not found, a timeout) or closed under a scan.
        return error(503, f"broker: {_one_line(exc)}")
    except Exception:
        log.exception("dashboard_request_failed", method=request.method, path=request.path)
        return error(500, "internal error: see the dashboard's log")


def _same_origin(request: web.Request) -> bool:
    """Whether a request may come from the dashboard's own page: a browser says where a request
    comes from in `Sec-Fetch-Site` and, for most, `Origin`. Another site's page can make the
    browser send a GET (an image, a no-cors fetch) with the cached basic-auth credentials; its
    answer is unreadable there, but a read of dead letters costs a scan of their queue."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser, or an older one: the Host guard and auth still apply
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest.lower() == request.host.lower()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- pages --------------------------------------------------------------------------------------


def static_dir() -> Path:
    return Path(str(resources.files("amqtask.dashboard") / "static"))


async def index(request: web.Request) -> web.StreamResponse:
    page = static_dir() / "index.html"
    if not page.is_file():
        return web.Response(
            text="<!doctype html><title>amqtask</title><p>The dashboard's page is missing.",
            content_type="text/html",
        )
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


# --- the API ------------------------------------------------------------------------------------


async def config(request: web.Request) -> web.Response:
    return json(request.app[DATA].config(read_only=request.app[SETTINGS].read_only))


async def overview(request: web.Request) -> web.Response:
    ok, data = await request.app[DATA].overview()
    return json(data, 200 if ok else 503)


async def rates(request: web.Request) -> web.Response:
    return json(request.app[DATA].rates())


async def dead_letter_queues(request: web.Request) -> web.Response:
    return json(request.app[DATA].dead_letter_queues())


def _int_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer") from None
    if value < 0:
        raise web.HTTPBadRequest(reason=f"{name} must not be negative")
    return value


async def dead_letters(request: web.Request) -> web.Response:
    data = request.app[DATA]
    offset = _int_query(request, "offset", 0)
    limit = _int_query(request, "limit", 50)
    return json(await data.dead_letters(request.match_info["task"], offset, limit))


async def dead_letter(request: web.Request) -> web.Response:
    info = request.match_info
    return json(await request.app[DATA].dead_letter(info["task"], info["message_id"]))


_SELECTION = (
    'expected {"letters": [{"id": "message id", "digest": "..."}, ...]}, '
    '{"ids": ["message id", ...]} or {"all": true}'
)


async def _selection(request: web.Request) -> tuple[list[str] | None, Selection | None]:
    """What a write action's body names: message ids (every copy of each), letters (one copy
    each, by id and digest), or neither for `{"all": true}`."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason=_SELECTION)
    if body.get("all") is True:
        return None, None
    letters = body.get("letters")
    if letters is not None:
        if not isinstance(letters, list) or not letters:
            raise web.HTTPBadRequest(reason=_SELECTION)
        pairs = []
        for letter in letters:
            if not isinstance(letter, dict):
                raise web.HTTPBadRequest(reason=_SELECTION)
            message_id, digest = letter.get("id"), letter.get("digest")
            if not isinstance(message_id, str) or not isinstance(digest, str):
                raise web.HTTPBadRequest(reason=_SELECTION)
            pairs.append((message_id, digest))
        return None, Selection(pairs)
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise web.HTTPBadRequest(reason=_SELECTION)
    return ids, None


async def replay(request: web.Request) -> web.Response:
    ids, letters = await _selection(request)
    return json(await request.app[DATA].replay(request.match_info["task"], ids, letters))


async def purge(request: web.Request) -> web.Response:
    ids, letters = await _selection(request)
    seen = None
    if ids is None and letters is None:  # all: up to the count seen, when the page sends it
        body = orjson.loads(await request.read())
        seen = body.get("count")
        if seen is not None and (not isinstance(seen, int) or isinstance(seen, bool) or seen < 0):
            raise web.HTTPBadRequest(reason="count must be the number of letters seen")
    try:
        return json(
            await request.app[DATA].purge(request.match_info["task"], ids, letters, seen=seen)
        )
    except MoreThanSeen as exc:
        return json({"error": str(exc), "count": exc.count}, 409)


async def schedules(request: web.Request) -> web.Response:
    return json(await request.app[DATA].schedules())


async def pause(request: web.Request) -> web.Response:
    return json(await request.app[DATA].set_paused(request.match_info["name"], True))


async def resume(request: web.Request) -> web.Response:
    return json(await request.app[DATA].set_paused(request.match_info["name"], False))


async def workers(request: web.Request) -> web.Response:
    return json(await request.app[DATA].workers())


async def tasks(request: web.Request) -> web.Response:
    query = request.query
    since = None
    if query.get("since"):
        try:
            since = parse_since(query["since"])
        except ValueError as exc:
            raise web.HTTPBadRequest(reason=f"since: {exc}") from None
        except OverflowError:  # a duration reaching back before the year 1
            raise web.HTTPBadRequest(reason="since: too far back") from None
    return json(
        await request.app[DATA].tasks(
            task_id=query.get("id") or None,
            state=query.get("state") or None,
            task=query.get("task") or None,
            since=since,
            limit=max(1, min(_int_query(request, "limit", 50), 500)),
        )
    )


async def task(request: web.Request) -> web.Response:
    return json(await request.app[DATA].task(request.match_info["id"]))


async def revoke(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    terminate = isinstance(body, dict) and body.get("terminate") is True
    return json(await request.app[DATA].revoke(request.match_info["id"], terminate=terminate))


async def contracts(request: web.Request) -> web.Response:
    return json(request.app[DATA].contracts_export())


async def not_found(request: web.Request) -> web.Response:
    return error(404, f"no endpoint {request.path}")


# On every answer, pages and API: no framing by another site (a framed page could be clicked
# through its confirmations), no type sniffing, no Referer with the dashboard's URL.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def routes(application: web.Application) -> None:
    application.on_response_prepare.append(_security_headers)
    router = application.router
    router.add_get("/", index)
    router.add_static("/static/", static_dir(), follow_symlinks=False)
    router.add_get("/api/config", config)
    router.add_get("/api/overview", overview)
    router.add_get("/api/rates", rates)
    router.add_get("/api/dead-letters", dead_letter_queues)
    router.add_get("/api/dead-letters/{task}", dead_letters)
    router.add_post("/api/dead-letters/{task}/replay", replay)
    router.add_post("/api/dead-letters/{task}/purge", purge)
    router.add_get("/api/dead-letters/{task}/{message_id}", dead_letter)
    router.add_get("/api/schedules", schedules)
    router.add_post("/api/schedules/{name}/pause", pause)
    router.add_post("/api/schedules/{name}/resume", resume)
    router.add_get("/api/workers", workers)
    router.add_get("/api/tasks", tasks)
    router.add_get("/api/tasks/{id}", task)
    router.add_post("/api/tasks/{id}/revoke", revoke)
    router.add_get("/api/contracts", contracts)
    router.add_route("*", "/api/{tail:.*}", not_found)
