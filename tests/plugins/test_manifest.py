from __future__ import annotations

import base64
import hashlib
import io
import json
import os
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
        "unreadable": 0, "duplicates": 1, "given_up": 0, "retry_later": 0,
        "skipped_existing": 0, "other_recipe": 0,
        "over_budget": 0, "capped": 0, "written": 4, "new": 4, "retried": 0, "recaptioned": 0,
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
        "unreadable": 0, "duplicates": 1, "given_up": 0, "retry_later": 0,
        "skipped_existing": 0, "other_recipe": 0,
        "over_budget": 0, "capped": 0, "written": 2, "new": 2, "retried": 0, "recaptioned": 0,
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


# -- images by what they are, every file left out named ---------------------------------------
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"j" * 40
PNG = b"\x89PNG\r\n\x1a\n" + b"p" * 40
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"h" * 40
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"m" * 40


def _skipped(folder: Path) -> list[dict]:
    return _read(folder / "skipped.jsonl")


def _default_exts() -> tuple[str, ...]:
    from caption_platform.config import ImageFilters

    return ImageFilters().extensions


def test_image_aliases_are_images_in_any_case(tmp_path: Path) -> None:
    from captioning import formats

    names = ["a.JPE", "b.jfif", "c.TIF", "d.heic", "e.HEIF", "f.avif", "g.Jpeg", "h.tiff",
             "i.JFIF"]
    src = tmp_path / "src"
    for i, name in enumerate(names):
        _write(src / name, f"bytes of {name} {i}".encode())  # by name: never read here
    out = tmp_path / "run" / "manifest.jsonl"
    stats = _build(f"file://{src}", out, extensions=_default_exts())
    assert (stats.written, stats.not_image) == (len(names), 0)
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in _read(out)) == sorted(names)
    # the default is the shared table's aliases, not a copy
    assert set(_default_exts()) == set(formats.IMAGE_EXTENSIONS)
    assert {"jpe", "jfif", "tif", "heic", "heif", "avif"} <= set(_default_exts())


def test_local_files_whose_name_says_nothing_are_sniffed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import caption_platform.manifest as manifest_mod

    src = tmp_path / "src"
    ids = {"IMG_0001": _write(src / "IMG_0001", JPEG), "scan.bin": _write(src / "scan.bin", PNG),
           "IMG_0002.": _write(src / "IMG_0002.", HEIC),
           "big_jpeg": _write(src / "big_jpeg", JPEG + b"\x00" * 100_000)}
    _write(src / "blob", b"hello, not an image")
    _write(src / "movie_noext", MOV)
    _write(src / "empty", b"")
    heads: list[int] = []
    real_head = manifest_mod.head_of_file

    def head_of_file(fs: Any, name: str, n: int = manifest_mod.SNIFF_BYTES) -> bytes:
        head = real_head(fs, name, n)
        heads.append(len(head))
        return head

    monkeypatch.setattr(manifest_mod, "head_of_file", head_of_file)
    out = tmp_path / "run" / "manifest.jsonl"
    stats = _build(f"file://{src}", out, max_bytes=1_000_000)
    assert {r["image_id"] for r in _read(out)} == set(ids.values())
    assert (stats.written, stats.not_image, stats.unaccounted()) == (4, 3, 0)
    # a few bytes each, never the file (big_jpeg is 100 kB)
    assert len(heads) == 7 and max(heads) <= manifest_mod.SNIFF_BYTES <= 512
    details = {r["uri"].rsplit("/", 1)[1]: r["detail"] for r in _skipped(out.parent)}
    assert set(details) == {"blob", "movie_noext", "empty"}
    assert details["movie_noext"] == manifest_mod.formats.describe(MOV)
    assert all(details.values())

    stats = _build(f"file://{src}", out, max_bytes=1_000_000, sniff="never")
    assert (stats.written, stats.not_image) == (0, 7)
    assert {r["reason"] for r in _skipped(out.parent)} == {"not_image"}
    assert all("images.sniff" in r["detail"] for r in _skipped(out.parent))


def test_a_live_photo_movie_beside_its_heic_is_not_an_image_and_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import caption_platform.manifest as manifest_mod

    src = tmp_path / "phone"
    heic = _write(src / "IMG_0001.HEIC", HEIC)
    for name, data in [("IMG_0001.MOV", MOV), ("IMG_0001.AAE", b"<?xml?>"),
                       (".DS_Store", b"\x00\x00\x00\x01Bud1"), ("IMG_0001.json", b"{}"),
                       ("IMG_0001.xmp", b"<x:xmpmeta/>"), ("RAW_0001.DNG", b"II*\x00dng")]:
        _write(src / name, data)
    read: list[str] = []
    monkeypatch.setattr(manifest_mod, "head_of_file",
                        lambda fs, name, n=512: read.append(name) or b"")
    out = tmp_path / "run" / "manifest.jsonl"
    stats = _build(f"file://{src}", out, extensions=_default_exts(), sniff="always")
    assert [r["image_id"] for r in _read(out)] == [heic]
    assert (stats.listed, stats.not_image, stats.written) == (7, 6, 1)
    assert read == []  # known non-image names are never read, even with sniff=always
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in _skipped(out.parent)}
    assert rows["IMG_0001.MOV"]["reason"] == "not_image"
    assert rows["IMG_0001.MOV"]["detail"] == ".mov: not an image"
    assert "camera raw" in rows["RAW_0001.DNG"]["detail"]


def test_object_store_files_are_sniffed_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioning import formats

    class _Ranged(_FakeGcsFs):
        ranges: list[tuple[str, int, int]] = []

        def cat_file(self, name: str, start: int | None = None, end: int | None = None):
            self.ranges.append((name, start, end))
            return self.objects[name][start:end]

    fs = _Ranged({"bkt/imgs/a.jpg": b"jpeg by name", "bkt/imgs/IMG_0002": JPEG,
                  "bkt/imgs/notes": b"text"})
    _gcs(monkeypatch, fs)
    out = tmp_path / "run" / "m.jsonl"
    stats = _build("gs://bkt/imgs", out)  # auto: no per-object read on gs://
    assert (stats.written, stats.not_image, fs.ranges) == (1, 2, [])
    assert {r["uri"] for r in _skipped(out.parent)} == {"gs://bkt/imgs/IMG_0002",
                                                        "gs://bkt/imgs/notes"}
    stats = _build("gs://bkt/imgs", out, sniff="always")
    assert (stats.written, stats.not_image) == (2, 1)
    head = formats.HEAD_BYTES
    assert sorted(fs.ranges) == [("bkt/imgs/IMG_0002", 0, head), ("bkt/imgs/notes", 0, head)]
    assert [r["uri"] for r in _skipped(out.parent)] == ["gs://bkt/imgs/notes"]


def test_images_sniff_is_validated_like_the_other_settings(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from caption_platform.config import SettingsError, load_settings

    assert load_settings().images.sniff == "auto"
    monkeypatch.setenv("CAPTION_IMAGES__SNIFF", "always")
    assert load_settings().images.sniff == "always"
    with pytest.raises(SettingsError, match=r"images.sniff.*choose one of auto, always, never"):
        load_settings(images={"sniff": "sometimes"})
    with pytest.raises(ValueError, match="images.sniff"):
        build_manifest("/nonexistent", "/tmp/x.jsonl", extensions=EXTS, min_bytes=0,
                       max_bytes=1, sniff="sometimes")


def test_every_file_left_out_is_named_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row per listed entry rejected, rows per reason == counts; the images left for
    what earlier runs did or by the run's limits are counted, not named."""
    import caption_platform.manifest as manifest_mod

    src, outside = tmp_path / "src", tmp_path / "outside"
    known = _write(src / "a_known.jpg", b"captioned before" * 3)
    _write(src / "b.jpg", b"image b" * 5)
    _write(src / "b_copy.jpg", b"image b" * 5)  # duplicate of b.jpg
    _write(src / "c.jpg", b"image c" * 5)
    _write(src / "d.png", b"image d" * 5)  # past max_images=2
    _write(src / "e.png", b"image e" * 5)  # past max_images=2
    _write(src / "locked.jpg", b"no access" * 5)
    _write(src / "tiny.jpg", b"t")
    _write(src / "big.jpg", b"b" * 2000)
    _write(src / "clip.mov", MOV)
    _write(outside / "x.jpg", b"outside")
    (src / "escape.jpg").symlink_to(outside / "x.jpg")
    os.mkfifo(src / "pipe")
    real_md5 = manifest_mod.md5_of_file

    def md5(fs: Any, name: str) -> str:
        if name.endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", name)
        return real_md5(fs, name)

    monkeypatch.setattr(manifest_mod, "md5_of_file", md5)
    out = tmp_path / "run" / "manifest.jsonl"
    stats = _build(f"file://{src}", out, min_bytes=2, exclude_ids=[known], max_images=2)
    rows = _skipped(out.parent)
    counts = stats.to_dict()
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert by_reason == {k: v for k, v in stats.skipped().items()
                         if v and k in manifest_mod.NAMED_REASONS}
    # every named reason is exercised (the dead letters' in test_selection.py)
    assert set(by_reason) == set(manifest_mod.NAMED_REASONS) - {"given_up", "retry_later"}
    assert (counts["skipped_existing"], counts["capped"]) == (1, 2)  # counted only
    counted = sum(counts[k] for k in manifest_mod.COUNTED_REASONS)
    assert len(rows) + counted + counts["written"] == counts["listed"] == 12
    assert all(list(r) == list(manifest_mod.SKIPPED_FIELDS) for r in rows)
    assert [r["uri"] for r in rows] == sorted(r["uri"] for r in rows)
    named = {r["uri"].removeprefix(f"file://{src}/"): r for r in rows}
    assert {name: r["reason"] for name, r in named.items()} == {
        "b_copy.jpg": "duplicates", "locked.jpg": "unreadable", "tiny.jpg": "too_small", "big.jpg": "too_large",
        "clip.mov": "not_image", "escape.jpg": "skipped_links", "pipe": "not_image"}
    assert named["b_copy.jpg"]["duplicate_of"] == f"file://{src}/b.jpg"
    assert "PermissionError" in named["locked.jpg"]["detail"]
    assert named["escape.jpg"]["detail"] == "link outside the source"
    assert named["pipe"]["detail"].startswith("not a regular file")
    assert [r["uri"] for r in _read(out)] == [f"file://{src}/b.jpg", f"file://{src}/c.jpg"]


def test_a_big_listing_left_out_goes_through_duckdb_rows_equal_counts(tmp_path: Path) -> None:
    """More rows than one batch: every skipped row is streamed out, none lost or repeated."""
    import caption_platform.manifest as manifest_mod

    src = tmp_path / "src"
    src.mkdir()
    n = manifest_mod._BATCH_ROWS + 7
    for i in range(n):
        (src / f"f{i:05d}.txt").write_bytes(b"")
    _write(src / "one.jpg", b"one image")
    out = tmp_path / "run" / "manifest.jsonl"
    stats = _build(f"file://{src}", out)
    assert (stats.not_image, stats.written) == (n, 1)
    with (out.parent / "skipped.jsonl").open() as handle:
        count = sum(1 for _ in handle)
    assert count == n
