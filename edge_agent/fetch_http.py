"""Bundle download over HTTP(S): the same content-addressed chunks, fetched with Range requests.

For large fleets the bundle can be served from a web server, CDN or object store instead of the
broker: a release's ``artifact_url`` names a directory holding ``manifest.json`` and the bundle's
files. Chunk *i* of a file is bytes ``[i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE)``, so the device asks
only for the ranges it lacks, checks each against its sha256, and keeps it in the same chunk
cache as MQTT downloads: a transfer resumes where it stopped, and what another version already
brought is not fetched again.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from edge_agent.fetch import FetchCancelled
from edge_agent.protocol.chunks import CHUNK_SIZE, check_chunk
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.manifest import MANIFEST_NAME, Manifest, sha256_bytes
from edge_agent.store import ModelStore

Progress = Callable[[int, int], None]


class HttpFetchError(ProtocolError):
    """The artifact server is unreachable or answered wrongly; transient, so the update is retried."""


class HttpChunkFetcher:
    """Fetches chunks from ``base_url`` into a :class:`ModelStore`.

    Args:
        base_url: ``http://`` or ``https://`` URL of the bundle directory.
        store: where verified chunks are kept.
        timeout_s: socket timeout per request.
    """

    def __init__(self, *, base_url: str, store: ModelStore, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpFetchError(f"artifact URL {base_url!r} is not an http(s) URL")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path.rstrip("/")
        self._store = store
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout_s, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
        return self._conn

    def _get(self, name: str, *, first: int | None = None, last: int | None = None, limit: int) -> bytes:
        headers = {"Range": f"bytes={first}-{last}"} if first is not None else {}
        url = f"{self._path}/{quote(name)}"
        try:
            conn = self._connection()
            conn.request("GET", url, headers=headers)
            response = conn.getresponse()
            body = response.read(limit + 1)
            if response.length:  # drain what we refused to take, or the connection is unusable
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise HttpFetchError(f"GET {url} from {self._host}: {exc}") from None
        expected = 206 if first is not None else 200
        if response.status != expected:
            raise HttpFetchError(f"GET {url} from {self._host} answered {response.status}, expected {expected}")
        if len(body) > limit:
            raise HttpFetchError(f"GET {url} from {self._host} sent more than the {limit} bytes asked for")
        return body

    def fetch_manifest(self, sha256: str, size: int) -> None:
        """Fetch ``manifest.json`` unless held; keep it only if it is the one the release signed."""
        if self._store.has_chunk(sha256):
            return
        data = self._get(MANIFEST_NAME, limit=size)
        check_chunk(sha256, data)
        self._store.put_chunk(sha256, data)

    def fetch(
        self, manifest: Manifest, *, progress: Progress | None = None, cancelled: Callable[[], bool] = lambda: False
    ) -> int:
        """Fetch every chunk of ``manifest`` not yet held; return the bytes transferred."""

        total = manifest.total_bytes
        held = transferred = 0
        try:
            for entry in manifest.files:
                for index, chunk in enumerate(entry.chunks):
                    first = index * CHUNK_SIZE
                    length = min(CHUNK_SIZE, entry.size - first)
                    if cancelled():
                        raise FetchCancelled("download cancelled")
                    if not self._store.has_chunk(chunk):
                        data = self._get(entry.path, first=first, last=first + length - 1, limit=length)
                        if len(data) != length or sha256_bytes(data) != chunk:
                            check_chunk(chunk, data)  # raises IntegrityError naming the chunk
                        self._store.put_chunk(chunk, data)
                        transferred += len(data)
                    held += length
                    if progress:
                        progress(held, total)
        finally:
            self.close()
        return transferred

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
