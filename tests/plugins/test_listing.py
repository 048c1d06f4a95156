"""Listing a source (caption_platform.listing): the local walk is fsspec's walk, streamed;
Cloud Storage is listed with its client against tools.fake_gcs_listing (Cloud Storage's
edge, in process): every object exactly once, foldered or flat, errors raised in the
consumer, threads stopped when it leaves, and a bounded number of objects held."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

# gcsfs reads this once, when first imported (as in tests/gcp/conftest.py): no gRPC probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from caption_platform import listing  # noqa: E402
from caption_platform.manifest import SourceError, build_manifest  # noqa: E402
from caption_platform.storage import storage_path  # noqa: E402
from tools import fake_gcs_listing as fake  # noqa: E402

KEYS = ("name", "size", "type", "islink")


def _fsspec_walk(root: Any) -> list[dict]:
    return [{k: info[k] for k in KEYS}
            for _, _, files in root.fs.walk(root.path, detail=True, on_error="raise")
            for info in files.values()]


def _tree(tmp_path: Path) -> Path:
    src, outside = tmp_path / "src", tmp_path / "outside"
    for name, data in {"a.jpg": b"a" * 10, "sub/b.png": b"b" * 20, "sub/deep/er/c.jpg": b"c",
                       "sub/deep/zero.jpg": b"", "odd name #1.jpg": b"odd"}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "empty" / "nested").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"s" * 33)
    (src / "sub" / "inside_link.jpg").symlink_to(src / "sub" / "b.png")
    (src / "escape.jpg").symlink_to(outside / "secret.jpg")
    (src / "dir_link").symlink_to(outside)
    (src / "sub" / "broken.jpg").symlink_to(src / "nothing_here.jpg")
    os.mkfifo(src / "sub" / "pipe")
    return src


def test_the_local_walk_lists_what_fsspecs_walk_lists(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    root = storage_path(f"file://{src}")
    got = list(listing.list_objects(root))
    assert sorted(got, key=lambda i: i["name"]) == sorted(_fsspec_walk(root),
                                                          key=lambda i: i["name"])
    by_name = {i["name"].removeprefix(f"{src}/"): i for i in got}
    assert len(got) == len(by_name) == 10
    # links are entries of their own (never followed into folders), sized as their target
    assert by_name["dir_link"] == {"name": f"{src}/dir_link", "size": by_name["dir_link"]["size"],
                                   "type": "other", "islink": True}
    assert not any(name.startswith("dir_link/") for name in by_name)
    assert (by_name["escape.jpg"]["size"], by_name["sub/broken.jpg"]["size"]) == (33, 0)
    assert by_name["sub/pipe"]["type"] == "other" and not by_name["sub/pipe"]["islink"]
    assert by_name["sub/deep/er/c.jpg"] == {"name": f"{src}/sub/deep/er/c.jpg", "size": 1,
                                            "type": "file", "islink": False}


def test_an_unreadable_local_folder_raises(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As root chmod changes nothing: the folder's scandir is made to refuse instead."""
    src = _tree(tmp_path)
    real = os.scandir

    def scandir(path: Any) -> Any:
        if str(path).endswith("/sub/deep"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    with pytest.raises(PermissionError, match="sub/deep"):
        list(listing.list_objects(storage_path(f"file://{src}")))
    with pytest.raises(SourceError, match="listing failed part-way: PermissionError"):
        build_manifest(f"file://{src}", f"file://{tmp_path}/m.jsonl", extensions=["jpg"],
                       min_bytes=0, max_bytes=100)


def test_other_filesystems_are_walked_by_fsspec() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("/listing-test/a.jpg", "/listing-test/sub/b.jpg"):
        fs.pipe(name, b"xy")

    class Root:
        protocol, path = "memory", "/listing-test"

    Root.fs = fs
    assert sorted(i["name"] for i in listing.list_objects(Root())) == [
        "/listing-test/a.jpg", "/listing-test/sub/b.jpg"]


# -- Cloud Storage, against the fake of its edge -------------------------------------------

def _listing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gcs-listing")]


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch):
    """``gcs(n, layout, fault=None)``: serve a namespace, point the Google clients and the
    default connection at it (as tools.gcp_emulators does); yields the requests seen."""
    stack = []

    def start(n: int, layout: str = "folders", fault: Any = None) -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []

        def record(path: str, query: dict[str, str]) -> Any:
            if path.endswith("/o"):
                seen.append(query)
            return fault(path, query) if fault else None

        server = fake.serve(n, prefix_layout=layout, fault=record)
        url = server.__enter__()
        stack.append(server)
        connection = {"conn_type": "google_cloud_platform",
                      "extra": {"project": "local-project", "is_anonymous": True}}
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("NO_GCE_CHECK", "True")
        monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(connection))
        return seen

    yield start
    for server in stack:
        server.__exit__(None, None, None)
    assert _listing_threads() == []


def _list(uri: str, **kwargs: Any) -> Any:
    return listing.list_objects(storage_path(uri, "google_cloud_default"),
                                conn_id="google_cloud_default", **kwargs)


@pytest.mark.parametrize(("layout", "root"), [("folders", "photos"), ("flat", "photos/"),
                                              ("folders", "")])
def test_every_object_is_listed_exactly_once(gcs: Any, layout: str, root: str) -> None:
    seen = gcs(5000, layout)
    got = list(_list(f"gs://{fake.BUCKET}/{root}"))
    counts = collections.Counter(i["name"] for i in got)
    assert len(got) == 5000 and max(counts.values()) == 1
    expected = {f"{fake.BUCKET}/{name}": {"name": f"{fake.BUCKET}/{name}", "size": size,
                                          "type": "file", "md5Hash": md5, "generation": gen}
                for name, size, md5, gen in fake.expected(5000, layout)}
    assert {i["name"]: i for i in got} == expected  # folder placeholders left out
    pages = [q for q in seen if q.get("maxResults") == "1000"]
    assert all(q.get("fields") == listing._FIELDS for q in pages)
    if layout == "flat":  # the names after the first page are cut into ranges
        ranges = [q for q in pages if "startOffset" in q]
        assert len(ranges) >= 4 and sum("endOffset" not in q for q in ranges) == 1
    elif root:  # each day folder listed by itself
        assert {q["prefix"] for q in pages} >= {f"photos/2026-12-{d:02d}/" for d in (1, 31)}


def test_a_failing_page_is_raised_in_the_consumer(gcs: Any) -> None:
    def fault(path: str, query: dict[str, str]) -> Any:
        later = query.get("pageToken") or query.get("startOffset")  # past its first page
        if query.get("prefix") == "photos/2026-12-07/" and later:
            return 403, "caller lacks storage.objects.list"
        return None

    gcs(100_000, "folders", fault)
    listed = 0
    with pytest.raises(PermissionError, match="storage.objects.list"):
        for _ in _list(f"gs://{fake.BUCKET}/photos"):
            listed += 1
    assert 0 < listed < 100_000
    assert _listing_threads() == []


def test_a_consumer_that_stops_early_stops_the_threads(gcs: Any) -> None:
    seen = gcs(200_000, "flat")
    objects = _list(f"gs://{fake.BUCKET}/photos", workers=4)
    first = [next(objects) for _ in range(10)]
    assert _listing_threads()
    objects.close()
    assert _listing_threads() == []
    requests = len(seen)
    time.sleep(0.3)
    assert len(seen) == requests < 50 and len(first) == 10


def test_the_objects_held_stay_bounded_however_slow_the_consumer(gcs: Any) -> None:
    """Objects listed but not yet consumed: at most the queue's pages and one page per thread
    (and the one being handed over), whatever the namespace's size."""
    workers, n = 4, 200_000
    seen = gcs(n, "flat")
    bound = (workers * listing.PAGES_PER_WORKER + workers + 2) * listing.PAGE_SIZE

    def listed_so_far() -> int:
        return sum(q.get("maxResults") == "1000" for q in seen) * listing.PAGE_SIZE

    consumed = 0
    for _ in _list(f"gs://{fake.BUCKET}/photos", workers=workers):
        if consumed == 0:  # let the listing threads run ahead until they are held back
            before, deadline = -1, time.monotonic() + 20
            while listed_so_far() != before and time.monotonic() < deadline:
                before = listed_so_far()
                time.sleep(0.5)
        consumed += 1
        if consumed % 500 == 0:
            assert listed_so_far() - consumed <= bound
    assert consumed == n
