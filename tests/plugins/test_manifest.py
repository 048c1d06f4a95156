from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from caption_platform.manifest import SourceError, build_manifest, md5_from_info
from captioning.uris import beam_path

EXTS = ("jpg", "jpeg", "png")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, str]:
    src = tmp_path / "src"
    ids = {
        "a": _write(src / "b_copy.JPG", b"image-A" * 10),  # duplicate, larger URI
        "a_dup": _write(src / "a.jpg", b"image-A" * 10),  # same bytes, smallest URI
        "b": _write(src / "sub" / "deep" / "c.png", b"image-B" * 10),
        "c": _write(src / "d.jpeg", b"image-C" * 10),
        "empty": _write(src / "zero.jpg", b""),  # kept: becomes a dead letter
    }
    _write(src / "notes.txt", b"not an image")
    _write(src / "noext", b"image-X")
    _write(src / "huge.png", b"x" * 5000)
    return ids


def test_filters_dedup_and_contract(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "run" / "manifest.jsonl"
    stats = build_manifest(
        f"file://{tmp_path / 'src'}", f"file://{out}", extensions=EXTS, min_bytes=0, max_bytes=1000
    )
    rows = _read(out)
    assert stats.to_dict() == {
        "listed": 8, "not_image": 2, "too_small": 0, "too_large": 1, "skipped_links": 0,
        "unreadable": 0, "duplicates": 1, "skipped_existing": 0, "capped": 0, "written": 4,
    }
    assert stats.unaccounted() == 0
    by_id = {r["image_id"]: r for r in rows}
    assert set(by_id) == {folder["a"], folder["b"], folder["c"], folder["empty"]}
    assert by_id[folder["a"]]["uri"] == f"file://{tmp_path}/src/a.jpg"  # smallest URI kept
    assert by_id[folder["b"]]["uri"] == f"file://{tmp_path}/src/sub/deep/c.png"  # recursive
    assert by_id[folder["empty"]]["size_bytes"] == 0
    assert [r["uri"] for r in rows] == sorted(r["uri"] for r in rows)
    assert all(list(r) == ["image_id", "uri", "size_bytes"] for r in rows)


def test_min_bytes_and_exclude_and_cap(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "m.jsonl"
    out.write_text("stale line\n" * 10)  # overwritten, not appended
    stats = build_manifest(
        str(tmp_path / "src"),  # a plain path works too
        str(out),
        extensions=["JPG", ".png", "jpeg"],
        min_bytes=1,
        max_bytes=10_000,
        exclude_ids=iter([folder["b"], "not-present"]),
        max_images=1,
    )
    rows = _read(out)
    # huge.png (5000 B) now passes; zero.jpg, notes.txt, noext are filtered
    assert stats.listed == 8 and stats.not_image == 2 and stats.too_small == 1
    assert stats.duplicates == 1 and stats.skipped_existing == 1
    assert stats.written == 1 and stats.capped == 2
    assert rows == [{"image_id": folder["a"], "uri": f"file://{tmp_path}/src/a.jpg",
                     "size_bytes": 70}]  # first by URI order


def test_empty_result_writes_empty_manifest(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "m.jsonl"
    stats = build_manifest(
        f"file://{tmp_path / 'src'}", f"file://{out}", extensions=["gif"], min_bytes=0,
        max_bytes=100,
    )
    assert stats.written == 0 and out.read_text() == ""


def test_gcs_md5_from_listing_info() -> None:
    data = b"some image bytes"
    # shape of a gcsfs info dict (object resource + fsspec keys), no network
    info = {
        "kind": "storage#object",
        "name": "my-bucket/images/cat.jpg",
        "bucket": "my-bucket",
        "size": len(data),
        "type": "file",
        "contentType": "image/jpeg",
        "crc32c": "yZRlqg==",
        "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
        "generation": "1700000000000000",
    }
    assert md5_from_info(info) == hashlib.md5(data).hexdigest()
    composite = {k: v for k, v in info.items() if k != "md5Hash"}
    assert md5_from_info(composite) is None  # composite objects: hash the bytes instead
    assert md5_from_info({"md5Hash": "not base64!"}) is None


class _FakeGcsFs:
    """The fsspec edge of gcsfs: a listing with md5Hash; reading bytes is an error."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def invalidate_cache(self, path: str | None = None) -> None:
        """fsspec's listing-cache reset (the manifest lists afresh every time)."""

    def info(self, path: str) -> dict:
        if not any(name.startswith(path.rstrip("/") + "/") for name in self.objects):
            raise FileNotFoundError(path)
        return {"name": path, "size": 0, "type": "directory"}

    def walk(self, path: str, detail: bool = False, on_error: str = "omit"):
        files = {
            name.rsplit("/", 1)[1]: {
                "kind": "storage#object", "name": name, "bucket": name.split("/", 1)[0],
                "size": len(data), "type": "file",
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            }
            for name, data in self.objects.items()
        }
        yield path, {}, files

    def open(self, name: str, mode: str = "rb"):
        raise AssertionError(f"downloaded {name}; the listing's md5Hash should have been used")


class _FakeGcsPath:
    protocol = "gs"

    def __init__(self, uri: str, fs: Any) -> None:
        self.uri, self.fs, self.path = uri, fs, uri.removeprefix("gs://")

    def __str__(self) -> str:
        return self.uri


def _gcs(monkeypatch: pytest.MonkeyPatch, fs: Any) -> None:
    import caption_platform.manifest as manifest_mod

    real = manifest_mod.storage_path
    monkeypatch.setattr(
        manifest_mod, "storage_path",
        lambda uri, conn_id=None: _FakeGcsPath(uri, fs) if uri.startswith("gs://") else real(uri),
    )


def _build(source: str, out: Path, **kwargs: Any) -> Any:
    return build_manifest(source, f"file://{out}", **{
        "extensions": EXTS, "min_bytes": 0, "max_bytes": 1000, **kwargs})


def test_a_missing_source_is_an_error_naming_it(tmp_path: Path) -> None:
    """It used to be a green run with listed: 0, exactly like an empty folder."""
    missing = f"file://{tmp_path}/does_not_exist"
    with pytest.raises(SourceError, match=f"{missing}: no such folder"):
        _build(missing, tmp_path / "m.jsonl")
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match="is a file, not a folder"):
        _build(f"file://{tmp_path}/a.jpg", tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_an_empty_source_is_an_error_not_an_empty_run(tmp_path: Path) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(SourceError, match="the folder is empty"):
        _build(f"file://{tmp_path}/empty", tmp_path / "m.jsonl")
    # a folder with files, none of them new images, is a run with nothing to do (not an error)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert _build(f"file://{tmp_path}/empty", tmp_path / "m.jsonl").not_image == 1


def test_an_unreachable_bucket_is_an_error_not_an_empty_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Unreachable(_FakeGcsFs):
        def info(self, path: str) -> dict:  # what gcsfs raises without a route to GCS
            raise OSError("Cannot connect to host storage.googleapis.com:443 ssl:default")

    _gcs(monkeypatch, _Unreachable({}))
    with pytest.raises(SourceError, match=r"gs://bkt/imgs: cannot be listed: OSError: Cannot"):
        _build("gs://bkt/imgs", tmp_path / "m.jsonl")
    _gcs(monkeypatch, _FakeGcsFs({"bkt/other/a.jpg": b"x"}))
    with pytest.raises(SourceError, match="gs://bkt/imgs: no such folder or bucket prefix"):
        _build("gs://bkt/imgs", tmp_path / "m.jsonl")


def test_every_listed_entry_is_counted_symlinks_included(tmp_path: Path) -> None:
    src, outside = tmp_path / "src", tmp_path / "outside"
    good = _write(src / "real.jpg", b"real image" * 5)
    _write(src / "sub" / "deep.png", b"deep image" * 5)
    secret = _write(outside / "secret.jpg", b"outside the root" * 3)
    (src / "inside_link.jpg").symlink_to(src / "sub" / "deep.png")  # followed: inside
    (src / "escape.jpg").symlink_to(outside / "secret.jpg")  # outside the root: skipped
    (src / "up.jpg").symlink_to("../outside/secret.jpg")  # relative escape: skipped
    (src / "dir_link").symlink_to(outside)  # links to folders are not followed
    (src / "broken.jpg").symlink_to(src / "nothing_here.jpg")
    _write(src / "big.jpg", b"b" * 2000)
    _write(src / "tiny.jpg", b"t")
    _write(src / "readme.md", b"text")
    out = tmp_path / "m.jsonl"
    stats = _build(f"file://{src}", out, min_bytes=2)
    assert stats.to_dict() == {
        "listed": 10, "not_image": 1, "too_small": 1, "too_large": 1, "skipped_links": 4,
        "unreadable": 0, "duplicates": 1, "skipped_existing": 0, "capped": 0, "written": 2,
    }
    assert stats.unaccounted() == 0
    rows = _read(out)
    assert good in {r["image_id"] for r in rows}
    assert secret not in {r["image_id"] for r in rows}
    # the link inside the root and its target are one image (same bytes): smallest URI kept
    assert sorted(r["uri"] for r in rows) == [f"file://{src}/inside_link.jpg",
                                              f"file://{src}/real.jpg"]


ODD_NAMES = ["a #1.jpg", "b%20c.jpg", "with space.png", "ünïcødé 猫.jpg", "q?x=1.jpg",
             "semi;colon&amp.jpg", "%E2%9C%93.jpg"]


def test_odd_file_names_round_trip_exactly(tmp_path: Path) -> None:
    """Names that need quoting in a URI keep their exact bytes: the job reads the same file."""
    src = tmp_path / "odd dir #2"
    ids = {name: _write(src / name, name.encode() * 3) for name in ODD_NAMES}
    out = tmp_path / "m.jsonl"
    stats = _build(f"file://{src}", out)
    assert stats.written == len(ODD_NAMES)
    by_id = {r["image_id"]: r["uri"] for r in _read(out)}
    for name, image_id in ids.items():
        uri = by_id[image_id]
        assert uri == f"file://{src}/{name}"
        assert Path(beam_path(uri)).read_bytes() == name.encode() * 3


def test_a_listing_that_fails_part_way_fails_the_plan_and_unreadable_files_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Composite(_FakeGcsFs):
        """Objects without md5Hash (composite uploads): their bytes must be read to hash."""

        def walk(self, path: str, detail: bool = False, on_error: str = "omit"):
            for _, dirs, files in super().walk(path, detail, on_error):
                yield path, dirs, {k: {key: v for key, v in info.items() if key != "md5Hash"}
                                   for k, info in files.items()}

        def open(self, name: str, mode: str = "rb"):
            if name.endswith("locked.jpg"):
                raise PermissionError(f"403 GET {name}: caller lacks storage.objects.get")
            return io.BytesIO(self.objects[name])

    _gcs(monkeypatch, _Composite({"bkt/imgs/ok.jpg": b"fine", "bkt/imgs/locked.jpg": b"no"}))
    out = tmp_path / "m.jsonl"
    stats = _build("gs://bkt/imgs", out)
    assert (stats.written, stats.unreadable, stats.unaccounted()) == (1, 1, 0)
    assert [r["uri"] for r in _read(out)] == ["gs://bkt/imgs/ok.jpg"]

    class _Breaks(_FakeGcsFs):
        def walk(self, path: str, detail: bool = False, on_error: str = "omit"):
            assert on_error == "raise"  # fsspec's default would skip the folder silently
            yield from super().walk(path, detail, on_error)
            raise OSError("503 Service Unavailable listing bkt/imgs/more/")

    _gcs(monkeypatch, _Breaks({"bkt/imgs/a.jpg": b"a"}))
    with pytest.raises(SourceError, match="gs://bkt/imgs: listing failed part-way: OSError"):
        _build("gs://bkt/imgs", tmp_path / "m2.jsonl")
