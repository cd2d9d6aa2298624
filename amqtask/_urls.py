"""Broker URLs: what is wrong with one before connecting, and how to show one without its secret.

Every message, log event and status line that names a URL goes through `safe_url`, so a password
never reaches a terminal, a log collector or an issue tracker.

A cluster is given as several URLs: a list, or one string with `,` or `;` between them (for
environment variables and command-line options).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

AMQP_SCHEMES = ("amqp", "amqps")
URL_FORM = "amqp[s]://USER:PASSWORD@HOST[:PORT][/VHOST]"

_USERINFO = re.compile(r"(?<=//)[^/?#]*@")
_SEPARATORS = re.compile(r"[,;]")


def split_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """The broker URLs in `urls`: a list of them, or one string of them separated by `,` or `;`
    (spaces around each are ignored; a `,` or `;` in a password must be percent-encoded).

    Raises `ValueError` when there is none.
    """
    parts = [urls] if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"a broker URL must be a string, got {part!r}")
        found += [url.strip() for url in _SEPARATORS.split(part) if url.strip()]
    if not found:
        raise ValueError(f"no broker URL given (expected {URL_FORM}, or several)")
    return tuple(found)


def safe_urls(urls: Sequence[str]) -> str:
    """Several URLs on one line, each without its password."""
    return ", ".join(safe_url(url) for url in urls)


def safe_url(url: str) -> str:
    """`url` with its password replaced by `***`; never raises, whatever `url` holds."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        # Too broken to take apart (an unclosed IPv6 bracket...): hide all the user part.
        return _USERINFO.sub("***@", url)


def password_of(url: str) -> str | None:
    """The password in `url` as written (percent-encoded), or None."""
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def user_of(url: str) -> str:
    """The user name an AMQP URL logs in with (`guest`, aio-pika's default, when it has none)."""
    try:
        return unquote(urlsplit(url).username or "guest")
    except ValueError:
        return "guest"


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names ('/' when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def url_problem(url: str) -> str | None:
    """Why aio-pika cannot connect to `url`, or None when it looks usable.

    Checked before connecting: a malformed URL would otherwise fail deep in aio-pika, or (for a
    robust connection) be retried forever.
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in AMQP_SCHEMES:
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        return f"{shown}: only amqp and amqps are supported"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    return None
