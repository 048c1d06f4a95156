"""Folders as cameras, phones and scanners fill them, through the caption_images DAG
(`dag.test()`, local profile): every image captioned, every other file named with its reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pendulum
import pytest
from local_profile import local_profile_env

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAY = pendulum.datetime(2026, 11, 20, tz="UTC")
pytestmark = pytest.mark.slow


def _picture(seed: int, size: tuple[int, int] = (96, 72)) -> Any:
    from PIL import Image

    image = Image.new("RGB", size, (40 * seed % 256, 90, 200 - 30 * seed % 200))
    for x in range(0, size[0], 8):  # some structure, so no two pictures hash alike
        for y in range(size[1]):
            image.putpixel((x, y), (255 - seed, (x * seed) % 256, y % 256))
    return image


def write_phone_export(root: Path) -> tuple[set[str], set[str]]:
    """A phone's export (DCIM) and a scanner's folder; returns (image names, other names)."""
    import pillow_heif
    from PIL import Image, ImageCms

    dcim = root / "DCIM" / "100APPLE"
    dcim.mkdir(parents=True)
    _picture(1).save(dcim / "IMG_0001.JPG", "JPEG")
    _picture(2).save(dcim / "IMG_0002.JPEG", "JPEG", exif=_rotated_exif())
    pillow_heif.register_heif_opener()
    _picture(3).save(dcim / "IMG_0003.HEIC", "HEIF")
    (dcim / "IMG_0003.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " * 8)
    (dcim / "IMG_0001.AAE").write_text('<?xml version="1.0"?><plist version="1.0"></plist>\n')
    _picture(4).save(root / "Photo.Png", "PNG")
    _picture(5).save(root / "plain.jpg", "JPEG")
    _picture(6).save(root / "web.jfif", "JPEG")
    _picture(7).save(root / "holiday.avif", "AVIF")
    _picture(8).save(root / "no_extension", "JPEG")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 40)
    (root / "IMG_0002.xmp").write_text('<x:xmpmeta xmlns:x="adobe:ns:meta/"></x:xmpmeta>\n')
    (root / "metadata.json").write_text('{"album": "holiday"}\n')
    scans = root / "scanner"
    scans.mkdir()
    _picture(9, (120, 160)).save(scans / "Scan.tif", "TIFF")
    pages = [_picture(10 + i, (80, 100)) for i in range(3)]
    pages[0].save(scans / "contract.tiff", "TIFF", save_all=True, append_images=pages[1:])
    _picture(13).convert("CMYK").save(scans / "cmyk.jpg", "JPEG")
    Image.fromarray(_gradient16(), mode="I;16").save(scans / "gray16.png", "PNG")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    _picture(14).save(scans / "with_profile.jpg", "JPEG", icc_profile=srgb.tobytes())
    images = {"IMG_0001.JPG", "IMG_0002.JPEG", "IMG_0003.HEIC", "Photo.Png", "plain.jpg",
              "web.jfif", "holiday.avif", "no_extension", "Scan.tif", "contract.tiff",
              "cmyk.jpg", "gray16.png", "with_profile.jpg"}
    others = {"IMG_0003.MOV", "IMG_0001.AAE", ".DS_Store", "IMG_0002.xmp", "metadata.json"}
    return images, others


def _rotated_exif() -> Any:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return exif


def _gradient16() -> Any:
    import numpy as np

    return (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)


@pytest.fixture
def camera_folder(tmp_path: Path, tiny_models: dict[str, str], airflow_db: str,
                  monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    images = tmp_path / "phone"
    names, others = write_phone_export(images)
    for key, value in local_profile_env(tmp_path, images, tiny_models).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    return {"images": images, "names": names, "others": others,
            "db": tmp_path / "warehouse.duckdb", "data": tmp_path / "data"}


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_every_image_a_camera_makes_is_captioned_and_every_other_file_named(
        camera_folder: dict[str, Any]) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dr = bag.dags["caption_images"].test(run_conf={"num_captions": 2, "num_beams": 2},
                                         logical_date=DAY, run_after=DAY)
    assert dr.state == "success"
    db = camera_folder["db"]

    captioned = {Path(uri).name for (uri,) in query(db, "SELECT uri FROM captions")}
    dead = query(db, "SELECT uri, stage, error FROM dead_letters")
    assert dead == [], dead
    assert captioned == camera_folder["names"]
    sizes = dict(query(db, "SELECT uri, width || 'x' || height FROM captions"))
    rotated = next(v for k, v in sizes.items() if k.endswith("IMG_0002.JPEG"))
    assert rotated == "72x96"  # EXIF orientation applied before captioning

    skipped = query(db, "SELECT uri, reason, detail FROM skipped_files WHERE run_id = ?",
                    dr.run_id)
    named = {Path(uri).name: (reason, detail) for uri, reason, detail in skipped}
    assert set(named) == camera_folder["others"], named
    assert {reason for reason, _ in named.values()} == {"not_image"}, named
    (row,) = query(db, "SELECT files_skipped, skipped_by_reason FROM pipeline_runs "
                       "WHERE run_id = ?", dr.run_id)
    assert row[0] == len(camera_folder["others"])
    assert json.loads(row[1]) == {"not_image": len(camera_folder["others"])}
    folder_record = next((camera_folder["data"] / "runs").iterdir()) / "skipped.jsonl"
    lines = [json.loads(line) for line in folder_record.read_text().splitlines()]
    assert {Path(r["uri"]).name for r in lines} == camera_folder["others"]
