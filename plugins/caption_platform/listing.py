"""List a run's source: every object once, streamed, several requests at a time, in bounded
memory whatever the source's size.

Why not fsspec's ``walk``: on ``gs://`` gcsfs keeps every folder it listed in its listing
cache (about 1.8 KB an object: gigabytes at millions of objects) and lists one folder at a
time, one page of 1,000 objects after another. Here Cloud Storage is listed with its own
client (the Google provider's ``GCSHook``): pages are handed on as they come and never
cached, and a source's sub-prefixes (or, for a flat prefix, ranges of names) are listed side
by side. Local folders are walked with ``os.scandir``, one directory open at a time. Any other
filesystem goes through fsspec's ``walk`` as before.

An entry is an fsspec-shaped info dict, what ``manifest._listing`` reads: ``name`` (as fsspec
names it: ``bucket/path`` on gs, the absolute path locally), ``size``, ``type`` (``"file"``,
``"directory"`` or ``"other"``), ``islink`` (local), ``md5Hash`` (base64, as Cloud Storage
gives it; absent for composite objects) and ``generation`` (gs). The order is not defined;
every object comes exactly once. Listing errors are raised, never skipped.
"""

from __future__ import annotations

import contextlib
import os
import queue
import string
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from caption_platform.storage import is_local

#: Objects per listing request (Cloud Storage's maximum).
PAGE_SIZE = 1000
#: Pages listed ahead of the consumer, per listing thread: the memory bound (with the one
#: page each thread may hold while the queue is full).
PAGES_PER_WORKER = 2
_FIELDS = "items(name,size,md5Hash,generation),nextPageToken,prefixes"
#: Where the names of a flat prefix are cut into ranges listed side by side (in name order).
_CUTS = string.digits + string.ascii_uppercase + string.ascii_lowercase
_POLL_S = 0.1
_DONE = object()


def list_objects(root: Any, *, conn_id: str | None = None, workers: int = 8) -> Iterator[dict]:
    """Yield an fsspec-shaped info dict for every entry under ``root`` (an
    ``ObjectStoragePath``), streamed: at most a few pages of entries are held at once.

    ``gs://`` on gcsfs is listed with the Cloud Storage client of ``conn_id`` (default
    ``google_cloud_default``), ``workers`` requests at a time; a local folder is walked; any
    other filesystem (a test double included) goes through ``fs.walk``.
    """
    if is_local(root):
        yield from _walk_local(root.path)
    elif root.protocol in ("gs", "gcs") and _is_gcsfs(root.fs):
        bucket, _, key = root.path.partition("/")
        prefix = key.strip("/") + "/" if key.strip("/") else ""
        yield from _list_gcs(_storage_client(conn_id), bucket, prefix, workers=workers)
    else:
        for _dirpath, _dirs, files in root.fs.walk(root.path, detail=True, on_error="raise"):
            yield from files.values()


# -- local folders --------------------------------------------------------------------------

def _walk_local(path: str) -> Iterator[dict]:
    """What fsspec's local ``walk(detail=True)`` lists, one directory open at a time.

    Symlinks are entries (``islink``; type from the link itself, size of its target, 0 when
    broken: fsspec's ``info`` of a scandir entry), never followed into folders. An unreadable
    folder raises; an entry gone between listing and ``stat`` is left out, as fsspec does.
    """
    folders = [path.rstrip("/") or "/"]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                try:
                    info = _local_info(entry)
                except FileNotFoundError:
                    continue
                if info["type"] == "directory":
                    folders.append(entry.path)
                else:
                    yield info


def _local_info(entry: os.DirEntry) -> dict:
    link = entry.is_symlink()
    size = entry.stat(follow_symlinks=False).st_size
    if link:
        try:
            size = entry.stat().st_size
        except OSError:
            size = 0
    kind = ("directory" if entry.is_dir(follow_symlinks=False)
            else "file" if entry.is_file(follow_symlinks=False) else "other")
    return {"name": entry.path, "size": size, "type": kind, "islink": link}


# -- Cloud Storage --------------------------------------------------------------------------

def _is_gcsfs(fs: Any) -> bool:
    return any(cls.__module__.startswith("gcsfs.") for cls in type(fs).__mro__)


def _storage_client(conn_id: str | None) -> Any:
    """The connection's google-cloud-storage client (``GCSHook``): its credentials, project
    and endpoint; ``STORAGE_EMULATOR_HOST`` points it at an emulator, as it does gcsfs."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return GCSHook(gcp_conn_id=conn_id or "google_cloud_default").get_conn()


class _Stopped(Exception):
    """The consumer has gone: a listing thread unwinds."""


class _Pages:
    """The listing threads and the bounded queue of pages between them and the consumer.

    A task may submit more tasks; when the last one ends the consumer gets ``_DONE``, and a
    task's error is put in the queue for the consumer to raise.
    """

    def __init__(self, workers: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=workers * PAGES_PER_WORKER)
        self.workers = workers
        self.stopped = threading.Event()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="gcs-listing")
        self._lock = threading.Lock()
        self.pending = 0

    def put(self, item: Any) -> None:
        """Wait for room in the queue, or raise :class:`_Stopped` when the consumer left."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def submit(self, task: Callable[..., None], *args: Any) -> None:
        if self.stopped.is_set():
            raise _Stopped
        with self._lock:
            self.pending += 1
        self._pool.submit(self._run, task, args)

    def _run(self, task: Callable[..., None], args: tuple) -> None:
        try:
            task(*args)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - every error reaches the consumer
            with contextlib.suppress(_Stopped):
                self.put(exc)
        finally:
            with self._lock:
                self.pending -= 1
                last = self.pending == 0
            if last:
                with contextlib.suppress(_Stopped):
                    self.put(_DONE)

    def close(self) -> None:
        """Stop every thread (each notices within ``_POLL_S`` or after its request)."""
        self.stopped.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _list_gcs(client: Any, bucket: str, prefix: str, *, workers: int) -> Iterator[dict]:
    pages = _Pages(workers)
    try:
        pages.submit(_list_root, client, bucket, prefix, pages)
        while (item := pages.queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        pages.close()


def _list_root(client: Any, bucket: str, prefix: str, pages: _Pages) -> None:
    """The root with a delimiter: its own objects here, each sub-prefix in another task. A
    flat root (no sub-prefix in a first page that is not the last) is cut into name ranges."""
    listed = _pages(client, bucket, prefix=prefix, delimiter="/")
    for n, raw in enumerate(listed):
        for sub in raw.get("prefixes", ()):
            pages.submit(_list_prefix, client, bucket, sub, pages)
        pages.put(_infos(bucket, raw))
        if n == 0 and raw.get("items") and not raw.get("prefixes") and raw.get("nextPageToken"):
            _split(client, bucket, prefix, raw["items"][-1]["name"], pages)
            return


def _list_prefix(client: Any, bucket: str, prefix: str, pages: _Pages) -> None:
    """Everything under a sub-prefix; cut into name ranges after its first page when more
    remain and some listing thread would otherwise be idle."""
    for n, raw in enumerate(_pages(client, bucket, prefix=prefix)):
        pages.put(_infos(bucket, raw))
        if (n == 0 and raw.get("items") and raw.get("nextPageToken")
                and pages.pending < pages.workers):
            _split(client, bucket, prefix, raw["items"][-1]["name"], pages)
            return


def _list_range(client: Any, bucket: str, prefix: str, start: str, end: str | None,
                skip: str | None, pages: _Pages) -> None:
    """Names in ``[start, end)`` under ``prefix``, but ``skip`` (listed already)."""
    for raw in _pages(client, bucket, prefix=prefix, start_offset=start, end_offset=end):
        pages.put([i for i in _infos(bucket, raw) if i["name"] != f"{bucket}/{skip}"])


def _split(client: Any, bucket: str, prefix: str, last: str, pages: _Pages) -> None:
    """List the names after ``last`` under ``prefix`` as ranges, one task each."""
    bounds = [last, *_cuts(client, bucket, prefix, last), None]
    for start, end in zip(bounds, bounds[1:], strict=False):
        pages.submit(_list_range, client, bucket, prefix, start, end,
                     last if start == last else None, pages)


def _cuts(client: Any, bucket: str, prefix: str, last: str) -> list[str]:
    """Range boundaries for the names after ``last``: found by a dozen one-object probes.

    The names left share a longest common start ``last[:k]`` (found by bisection); they are
    cut at the character after it, from ``last[k]`` up to the highest one there is.
    """
    lo, hi = len(prefix), len(last)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _any_from(client, bucket, prefix, _past(last[:mid])):
            hi = mid - 1
        else:
            lo = mid
    common = last[:lo]
    chars = [c for c in _CUTS if lo == len(last) or c > last[lo]]
    lo, hi = 0, len(chars)  # how many cuts have names at or after them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _any_from(client, bucket, prefix, common + chars[mid - 1]):
            lo = mid
        else:
            hi = mid - 1
    return [common + c for c in chars[:lo]]


def _past(start: str) -> str | None:
    """The first name after every name starting with ``start`` (None: there is none)."""
    code = ord(start[-1]) + 1
    if 0xD800 <= code < 0xE000:  # surrogates are no characters of a name
        code = 0xE000
    return start[:-1] + chr(code) if code <= 0x10FFFF else None


def _any_from(client: Any, bucket: str, prefix: str, start: str | None) -> bool:
    """Whether some object under ``prefix`` is named ``start`` or after it."""
    if start is None:
        return False
    with _as_os_error(bucket, prefix):
        probe = client.list_blobs(bucket, prefix=prefix, start_offset=start, max_results=1,
                                  fields="items(name),nextPageToken")
        return next(iter(probe), None) is not None


def _pages(client: Any, bucket: str, **query: Any) -> Iterator[dict]:
    """The raw JSON pages of one listing, fetched one at a time as they are asked for."""
    blobs = client.list_blobs(bucket, page_size=PAGE_SIZE, fields=_FIELDS,
                              **{k: v for k, v in query.items() if v is not None})
    with _as_os_error(bucket, query["prefix"]):
        yield from (page.raw_page for page in blobs.pages)


@contextlib.contextmanager
def _as_os_error(bucket: str, prefix: str) -> Iterator[None]:
    """Cloud Storage's errors as ``OSError`` (403: PermissionError, 404: FileNotFoundError),
    as gcsfs raised them: the manifest names the source of a listing that failed part-way."""
    from google.api_core import exceptions

    try:
        yield
    except exceptions.GoogleAPICallError as exc:
        error = {403: PermissionError, 404: FileNotFoundError}.get(exc.code or 0, OSError)
        raise error(f"listing gs://{bucket}/{prefix}: {exc}") from exc


def _infos(bucket: str, raw: dict) -> list[dict]:
    """A page's objects as fsspec info dicts; "folder" placeholders (names ending in "/")
    are no objects of the source (fsspec lists them as folders)."""
    infos = []
    for item in raw.get("items", ()):
        if item["name"].endswith("/"):
            continue
        info = {"name": f"{bucket}/{item['name']}", "size": int(item.get("size", 0)),
                "type": "file", "generation": int(item.get("generation", 0))}
        if "md5Hash" in item:
            info["md5Hash"] = item["md5Hash"]
        infos.append(info)
    return infos
