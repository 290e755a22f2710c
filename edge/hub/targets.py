"""Which outpost-cloud URL the edge dials next. Sans-IO: the policy is tested without sockets.

An edge may know several replicas of outpost-cloud (``outpost run --cloud A --cloud B``) with
no load balancer in front of them. It dials the URL that last served it first; when an attempt
fails there, it moves on to the next configured URL, round-robin.

A replica that does not serve the node redirects the edge to the one that does. The edge
follows at once, within the same attempt, at most ``MAX_REDIRECTS`` times in a row, so that
replicas that disagree cannot bounce it forever. If the redirect's target then fails, the next
attempt starts again at the replica that redirected: it answered, so it is up, and it takes the
node over once the owner's lease has run out.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit, urlunsplit

MAX_REDIRECTS = 3

_HTTP_SCHEMES = {"wss": "https", "ws": "http"}


def cloud_url_of(location: str, request_url: str) -> str:
    """The cloud URL (``https://host:port``) a redirect's ``Location`` points to; a relative
    one is resolved against the URL that was redirected."""
    parts = urlsplit(urljoin(request_url, location))
    scheme = _HTTP_SCHEMES.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class Targets:
    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one cloud URL is needed")
        self.urls = list(dict.fromkeys(urls))
        self._index = 0
        self._preferred: str | None = None

    def first(self) -> str:
        """Where the next attempt starts."""
        return self._preferred or self.urls[self._index]

    def succeeded(self, url: str) -> None:
        """A session opened at ``url`` (configured or redirected to): start there next time."""
        self._preferred = url
        if url in self.urls:
            self._index = self.urls.index(url)

    def failed(self, started: str, *, answered: bool) -> None:
        """An attempt that started at ``started`` opened no session. ``answered``: that URL
        redirected it, and the failure came after."""
        if answered:
            self._preferred = started
            return
        self._preferred = None
        if started in self.urls:
            self._index = (self.urls.index(started) + 1) % len(self.urls)
