"""Credentials never leave the process: URLs and error texts are redacted before a log, Event or status.

Why a module of its own: a password in a URL's userinfo or a bearer token can reach a human through
many paths (a connection error quoting the URL, a settings error quoting the offending line of
YAML), and every such path goes through these two functions.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

MASK = "***"
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<userinfo>[^/?#@]*)@")


def redact_url(url: str) -> str:
    """The URL with its userinfo (user:password@, or a token@) replaced by ***@; else unchanged."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme') or ''}{MASK}@", url, count=1)


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL's userinfo, as written and percent-decoded."""
    m = _USERINFO.match(url)
    if m is None:
        return []
    userinfo = m.group("userinfo")
    parts = [userinfo.partition(":")[2] or userinfo]
    return [p for s in parts for p in {s, urllib.parse.unquote(s)} if p]


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (longest first) replaced by ***."""
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
