"""A thin fake of Cloud Storage's edge for object listing, in process: the JSON API's
``objects.list`` and ``objects.get`` over a generated namespace of N objects, for the tests
and benchmarks of ``caption_platform.listing`` at sizes no emulator holds.

Point google-cloud-storage at it as at an emulator: ``STORAGE_EMULATOR_HOST=<the URL>`` and
anonymous credentials. It binds 127.0.0.1 only and makes no other network access.

* ``GET /storage/v1/b/BUCKET/o``: ``prefix``, ``delimiter``, ``startOffset``, ``endOffset``,
  ``pageToken``, ``maxResults`` (items and prefixes together, at most 1,000) and ``fields``
  (``items(a,b),nextPageToken,prefixes``) as the real API has them;
* ``GET /storage/v1/b/BUCKET/o/NAME``: one object's metadata (404 for none);
* ``GET /storage/v1/b/BUCKET``: the bucket's (the client asks for it once, for tracing).

The namespace is computed from indices, a page at a time, never all N names in memory: the
``folders`` layout is ``photos/2026-12-DD/img_IIIIIIII.jpg`` spread in order over up to 31
day folders, each with its "folder placeholder" object ``photos/2026-12-DD/`` (as the Cloud
console makes them); ``flat`` is ``photos/img_IIIIIIII.jpg``. Names sort as their indices, so
a page starts with a bisection. Sizes, MD5s (base64, as Cloud Storage lists them) and
generations are deterministic from the index (:func:`expected`).

Not emulated: uploads, downloads (``alt=media``), other bucket calls, versions, ``matchGlob``,
``includeTrailingDelimiter``, soft-deleted objects, auth (every caller is let in).
``fault`` answers chosen requests with an error instead (and sees every request).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKET = "fake-photos"
LAYOUTS = ("folders", "flat")
MAX_RESULTS = 1000
_GENERATION = 1_767_225_600_000_000
#: ``fault(path, query)`` -> ``(status, message)`` to answer that request with an error.
Fault = Callable[[str, dict[str, str]], "tuple[int, str] | None"]


class Namespace:
    """N objects (and the folders' placeholders) as a sorted sequence of names by index."""

    def __init__(self, n_objects: int, layout: str = "folders") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"prefix_layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        self.n, self.layout = n_objects, layout
        self.per_day = -(-n_objects // min(31, n_objects)) if n_objects else 1
        days = -(-n_objects // self.per_day)
        self.entries = n_objects + (days if layout == "folders" else 0)

    def _object(self, e: int) -> int | None:
        """The object index of entry ``e``; None for a folder placeholder."""
        if self.layout == "flat":
            return e
        day, r = divmod(e, self.per_day + 1)
        return None if r == 0 else day * self.per_day + r - 1

    def name(self, e: int) -> str:
        if self.layout == "flat":
            return f"photos/img_{e:08d}.jpg"
        i = self._object(e)
        day = e // (self.per_day + 1)
        folder = f"photos/2026-12-{day + 1:02d}/"
        return folder if i is None else f"{folder}img_{i:08d}.jpg"

    def resource(self, e: int, bucket: str) -> dict:
        i = self._object(e)
        data = b"" if i is None else f"image {i}".encode()
        return {"kind": "storage#object", "bucket": bucket, "name": self.name(e),
                "id": f"{bucket}/{self.name(e)}/{_GENERATION + e}",
                "size": str(0 if i is None else 1024 + i * 7919 % 65536),
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
                "generation": str(_GENERATION + e), "metageneration": "1",
                "contentType": "application/x-directory" if i is None else "image/jpeg",
                "storageClass": "STANDARD"}

    def first_from(self, name: str) -> int:
        """The first entry named ``name`` or after it."""
        return bisect.bisect_left(range(self.entries), name, key=self.name)

    def find(self, name: str) -> int | None:
        e = self.first_from(name)
        return e if e < self.entries and self.name(e) == name else None

    def page(self, prefix: str = "", delimiter: str = "", start: str = "", end: str = "",
             token: str = "", max_results: int = MAX_RESULTS) -> dict:
        """One ``objects.list`` response (all fields)."""
        e = max(self.first_from(max(prefix, start)), int(token or 0))
        items: list[int] = []
        prefixes: list[str] = []

        def listed(e: int) -> str | None:
            if e >= self.entries:
                return None
            name = self.name(e)
            return name if name.startswith(prefix) and not (end and name >= end) else None

        while (name := listed(e)) is not None and len(items) + len(prefixes) < max_results:
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            if cut < 0:
                items.append(e)
                e += 1
                continue
            prefixes.append(folder := name[:cut + len(delimiter)])
            e = self.first_from(folder[:-1] + chr(ord(folder[-1]) + 1))  # past the folder
        out: dict = {"kind": "storage#objects"}
        if items:
            out["items"] = items
        if prefixes:
            out["prefixes"] = prefixes
        if listed(e) is not None:
            out["nextPageToken"] = str(e)
        return out


def expected(n_objects: int, layout: str = "folders") -> Iterator[tuple[str, int, str, int]]:
    """Every object as ``(name, size, md5Hash, generation)``, placeholders left out."""
    ns = Namespace(n_objects, layout)
    for e in range(ns.entries):
        if ns._object(e) is not None:
            r = ns.resource(e, BUCKET)
            yield r["name"], int(r["size"]), r["md5Hash"], int(r["generation"])


def _select(response: dict, fields: str) -> dict:
    """Apply a ``fields`` mask of the form ``items(a,b),nextPageToken,prefixes``."""
    if not fields:
        return response
    wanted = {m[1]: m[2] for m in re.finditer(r"(\w+)(?:\(([^)]*)\))?", fields)}
    out = {k: v for k, v in response.items() if k in wanted}
    if wanted.get("items") and "items" in out:
        keep = set(wanted["items"].split(","))
        out["items"] = [{k: v for k, v in item.items() if k in keep} for item in out["items"]]
    return out


def _handler(ns: Namespace, bucket: str, fault: Fault | None) -> type[BaseHTTPRequestHandler]:
    listing = re.compile(rf"/storage/v1/b/{re.escape(bucket)}(?P<o>/o(?:/(?P<name>.+))?)?")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"code": status, "message": message,
                                          "errors": [{"message": message}]}})

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if fault and (err := fault(url.path, query)):
                return self._error(*err)
            if not (match := listing.fullmatch(url.path)):
                return self._error(404, f"not found: {url.path}")
            if not match["o"]:
                return self._send(200, {"kind": "storage#bucket", "id": bucket, "name": bucket,
                                        "location": "US", "storageClass": "STANDARD"})
            if match["name"]:
                name = urllib.parse.unquote(match["name"])
                e = ns.find(name)
                if e is None:
                    return self._error(404, f"No such object: {bucket}/{name}")
                return self._send(200, _select(ns.resource(e, bucket), query.get("fields", "")))
            page = ns.page(query.get("prefix", ""), query.get("delimiter", ""),
                           query.get("startOffset", ""), query.get("endOffset", ""),
                           query.get("pageToken", ""),
                           min(int(query.get("maxResults", MAX_RESULTS)), MAX_RESULTS))
            if "items" in page:
                page["items"] = [ns.resource(e, bucket) for e in page["items"]]
            return self._send(200, _select(page, query.get("fields", "")))

    return Handler


@contextlib.contextmanager
def serve(n_objects: int, *, prefix_layout: str = "folders", bucket: str = BUCKET,
          fault: Fault | None = None) -> Iterator[str]:
    """Serve a namespace of ``n_objects`` in ``bucket`` on a free port of 127.0.0.1 and
    yield its base URL (for ``STORAGE_EMULATOR_HOST``)."""
    ns = Namespace(n_objects, prefix_layout)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ns, bucket, fault))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-gcs-listing",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
