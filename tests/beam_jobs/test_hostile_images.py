"""Hostile input through the real job: odd file names, lying and enormous images, files
outside the allowed roots, files that are not regular files (a FIFO whose read would never
return), a per-image time limit, and limits the model itself sets."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
from job_helpers import planned_entry, read_summary, read_table, run_job_process
from PIL import Image

from captioning.images import ReadAndDecodeFn
from captioning.sample_images import md5_file, write_manifest
from captioning.uris import beam_path

ODD_NAMES = ["a #1.jpg", "b%20c.jpg", "with space.png", "ünïcødé 猫.jpg", "q?x=1.jpg",
             "%E2%9C%93.png"]


def _picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt: str, **kwargs: Any) -> None:
    img.save(path, format=fmt, **kwargs)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header says ``width`` x ``height`` whatever its data holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its frame header (SOF0) rewritten to claim another size."""
    buf = io.BytesIO()
    _picture(7).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_hostile_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """File name -> (expected outcome: ok | read | decode, a phrase the reason must hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, str]] = {}
    # decompression bomb: 400 megapixels of zeros compress to a few hundred KB
    raw = zlib.compress(b"\x00" * (20_000 * 3 + 1) * 50, 9)  # only 50 rows of data
    (folder / "bomb.png").write_bytes(_png_claiming(20_000, 20_000, raw))
    out["bomb.png"] = ("decode", "pixel")
    # header says 3000x3000 (under the pixel limit), the compressed data stops part-way
    rows = zlib.compress(bytes(range(256)) * 40 * 20)
    (folder / "lying_header.png").write_bytes(_png_claiming(3000, 3000, rows[:3000]))
    out["lying_header.png"] = ("decode", "cannot decode")
    # header says 3000x3000, a complete data stream holds one row: Pillow fills the rest
    # with black, as for any short PNG; memory stays within --max_image_pixels
    (folder / "short_data.png").write_bytes(
        _png_claiming(3000, 3000, zlib.compress(b"\x00" * (3000 * 3 + 1))))
    out["short_data.png"] = ("ok", "")
    # enormous dimensions in a tiny file
    (folder / "huge_dims.jpg").write_bytes(_jpeg_claiming(60_000, 60_000))
    out["huge_dims.jpg"] = ("decode", "pixel")
    buf = io.BytesIO()
    _picture(8).save(buf, "GIF")
    gif = bytearray(buf.getvalue())
    gif[6:10] = struct.pack("<HH", 65_535, 65_535)  # the logical screen: 4.3 gigapixels
    (folder / "huge_dims.gif").write_bytes(bytes(gif))
    out["huge_dims.gif"] = ("decode", "pixel")
    # animated and multi-frame files: the first frame is captioned
    frames = [_picture(k) for k in range(3)]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    out["animated.png"] = ("ok", "")
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:])
    out["animated.webp"] = ("ok", "")
    frames[0].save(folder / "pages.tiff", save_all=True, append_images=frames[1:])
    out["pages.tiff"] = ("ok", "")
    # truncated and zero-byte files
    buf = io.BytesIO()
    _picture(9, (200, 160)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[:300])
    out["truncated.png"] = ("decode", "truncated PNG at byte 300 of at least ")
    (folder / "zero.jpg").write_bytes(b"")
    out["zero.jpg"] = ("decode", "empty")
    # wrong extensions: a PNG named .jpg is still a picture; text named .png is not
    _save(_picture(11), folder / "png_named.jpg", "PNG")
    out["png_named.jpg"] = ("ok", "")
    (folder / "text_named.png").write_text("<html>not an image</html>")
    out["text_named.png"] = ("decode", "not an image: starts like an HTML page")
    # over --max_image_bytes (set to 60 KB below): refused at read, never decoded
    _save(_picture(12, (200, 200)), folder / "too_big.png", "PNG")
    out["too_big.png"] = ("read", "max_image_bytes")
    return out


# The job as its own process must exit this long after it starts, whatever a read is doing
# (it used to write everything, then wait forever on the thread stuck reading a FIFO).
JOB_EXIT_S = 120


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory,
                tiny_models: dict[str, str]) -> dict[str, Any]:
    """The hostile corpus through the job run as its own process, as Airflow runs it."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    expected = write_hostile_corpus(images)
    for index, name in enumerate(ODD_NAMES):
        _save(_picture(100 + index), images / name, "PNG" if name.endswith("png") else "JPEG")
        expected[name] = ("ok", "")
    # not regular files: opening a FIFO for reading waits for a writer that never comes
    os.mkfifo(images / "fifo.jpg")
    expected["fifo.jpg"] = ("read", "not a regular file (a FIFO)")
    (images / "folder.png").mkdir()
    expected["folder.png"] = ("read", "not a regular file (a directory)")
    outside = root / "outside"
    outside.mkdir()
    _save(_picture(200), outside / "secret.jpg", "JPEG")
    manifest = root / "manifest.jsonl"
    rows = write_manifest(images, manifest, extra_uris=[
        f"file://{images / 'fifo.jpg'}", f"file://{images / 'folder.png'}"])
    secret = {"image_id": md5_file(outside / "secret.jpg"),
              "uri": f"file://{outside / 'secret.jpg'}", "size_bytes": 10}
    sneaky = {**secret, "image_id": "0" * 32, "uri": f"file://{images}/../outside/secret.jpg"}
    with manifest.open("a") as handle:  # a hand-edited manifest reaching outside the root
        for row in (secret, sneaky):
            handle.write(json.dumps(row) + "\n")
    expected["secret.jpg"] = ("read", "outside the allowed source roots")
    output = root / "out"
    # the time limit stays small: a read that blocks costs the run at most this long
    job = run_job_process(tiny_models, manifest, output, timeout_s=JOB_EXIT_S,
                          run_id="hostile-1", max_image_pixels=10_000_000,
                          max_image_bytes=60_000, source_roots=f"file://{images}",
                          image_timeout_s=10)
    assert job.returncode == 0, job.stderr[-4000:]
    return {"output": output, "summary": read_summary(output), "expected": expected,
            "rows": rows, "images": images, "stdout": job.stdout}


def test_every_hostile_file_is_captioned_or_dead_lettered_with_its_reason(
        hostile_run: dict[str, Any]) -> None:
    captions = {Path(beam_path(r["uri"])).name: r for r in
                read_table(hostile_run["output"], "captions")}
    dead = read_table(hostile_run["output"], "dead_letters")
    dead_by_name: dict[str, list[dict]] = {}
    for row in dead:
        dead_by_name.setdefault(Path(beam_path(row["uri"])).name, []).append(row)
    for name, (outcome, phrase) in hostile_run["expected"].items():
        if outcome == "ok":
            assert name in captions and name not in dead_by_name, name
            assert captions[name]["width"] > 0
            continue
        assert name not in captions, name
        rows = dead_by_name[name]
        assert {r["stage"] for r in rows} == {outcome}, (name, rows)
        assert all(phrase.lower() in r["error"].lower() for r in rows), (name, rows)
    assert len(dead_by_name["secret.jpg"]) == 2  # the plain path and the ../ escape
    summary = hostile_run["summary"]
    assert summary["counters"]["captioned"] == len(captions)


def test_odd_file_names_are_captioned_under_their_own_uri(hostile_run: dict[str, Any]) -> None:
    """Names needing URI quoting used to be unquoted into other paths (FileNotFoundError)."""
    captions = read_table(hostile_run["output"], "captions")
    by_uri = {r["uri"] for r in captions}
    for name in ODD_NAMES:
        assert f"file://{hostile_run['images'] / name}" in by_uri, name


def test_a_slow_image_is_dead_lettered_and_the_worker_moves_on(tmp_path: Path) -> None:
    """The per-image time limit: an image over --image_timeout_s becomes a dead letter and
    the next image is decoded normally (one stuck file cannot stall the worker)."""
    slow = tmp_path / "slow.png"
    _save(_picture(3, (2400, 2400)), slow, "PNG")
    small = tmp_path / "small.png"
    _save(_picture(4), small, "PNG")
    fn = ReadAndDecodeFn("r1", 10**9, 10**8, 0, timeout_s=0.001)
    fn.setup()
    try:
        first = list(fn.process(planned_entry(slow)))
        fn._limit.limit_s = 30.0
        second = list(fn.process(planned_entry(small)))
    finally:
        fn.teardown()
    assert first[0].tag == "dead_letters"
    assert first[0].value["stage"] == "decode" and "image_timeout_s" in first[0].value["error"]
    assert second[0].image_id == md5_file(small) and second[0].image.size == (48, 40)


def test_the_job_exits_once_its_outputs_are_written_with_a_fifo_in_the_manifest(
        hostile_run: dict[str, Any]) -> None:
    """By hand, a manifest with one FIFO wrote "1 captioned, 1 dead letters" and was still
    running 300 s later: the thread stuck opening the FIFO was joined at interpreter exit.
    Now the FIFO is refused unread (not a regular file) and the process ends (the fixture
    waits at most JOB_EXIT_S for it)."""
    dead = {Path(beam_path(r["uri"])).name: r
            for r in read_table(hostile_run["output"], "dead_letters")}
    assert dead["fifo.jpg"]["stage"] == "read"
    assert "is not a regular file (a FIFO)" in dead["fifo.jpg"]["error"]
    assert "image_timeout_s" not in dead["fifo.jpg"]["error"]  # refused, not waited on
    assert " captioned, " in hostile_run["stdout"]


def test_an_abandoned_read_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """A call over the time limit is abandoned on a thread that cannot hold the process:
    here a plain open() of a FIFO (a read that never returns, like a dead network mount)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        from captioning.images import ImageTimeout, _TimeLimit
        try:
            _TimeLimit(0.2)(open, {str(fifo)!r}, "rb")
        except ImageTimeout as e:
            print("abandoned:", e, flush=True)
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the process never exited: the thread stuck in the read was joined at exit")
    assert proc.returncode == 0, proc.stderr
    assert "abandoned:" in proc.stdout


def _in_thread(fn: Any, *args: Any, timeout_s: float = 20) -> Any:
    """``fn(*args)`` on a daemon thread; fail (instead of hanging the tests) if it blocks."""
    import threading

    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked for {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_reading_refuses_what_is_not_a_regular_file_without_blocking(
        tmp_path: Path, kind: str) -> None:
    from captioning.images import read_and_decode

    path = {"fifo": tmp_path / "x.jpg", "directory": tmp_path / "d.jpg",
            "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    stage, error = _in_thread(read_and_decode, f"file://{path}", 1000, 10**6, 0)
    assert stage == "read"
    assert f"{str(path)!r} is not a regular file" in str(error), error


def test_a_fifo_swapped_in_after_the_check_cannot_block_the_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check (stat) and the open are two calls: the open itself never waits for a
    writer (O_NONBLOCK) and what was opened is checked again."""
    from captioning import uris

    regular = tmp_path / "regular.jpg"
    regular.write_bytes(b"x")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    # the check before the open saw a regular file; a FIFO is there by the open
    monkeypatch.setattr(uris, "not_regular_reason", lambda path: None)
    with pytest.raises(uris.NotARegularFile, match="not a regular file"):
        _in_thread(uris.open_regular, str(fifo))
    monkeypatch.undo()
    with _in_thread(uris.open_regular, str(regular)) as handle:  # blocking reads again
        assert handle.read() == b"x"
        assert os.get_blocking(handle.fileno())


def test_max_new_tokens_over_the_models_positions_fails_before_any_image_is_read(
        tmp_path: Path, run_job: Any, tiny_models: dict[str, str]) -> None:
    """It used to dead-letter every image with IndexError and end green."""
    from captioning.options import CaptionOptionsError

    images = tmp_path / "images"
    images.mkdir()
    _save(_picture(1), images / "a.png", "PNG")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(images, manifest)
    with pytest.raises(CaptionOptionsError, match=r"--max_new_tokens: 65 is more than BLIP "
                       r"model .* has 64 positions, so max_new_tokens may be at most 64"):
        run_job(manifest, tmp_path / "out", max_new_tokens=65)
    assert not (tmp_path / "out").exists()


def test_the_exact_limit_with_a_prompt_is_checked_when_blip_loads(
        tiny_models: dict[str, str]) -> None:
    from captioning.model_handlers import BlipCaptionModelHandler

    ok = BlipCaptionModelHandler(tiny_models["blip"], num_captions=1, num_beams=1,
                                 max_new_tokens=61, prompt="a photo of")
    assert ok.load_model().model is not None
    over = BlipCaptionModelHandler(tiny_models["blip"], num_captions=1, num_beams=1,
                                   max_new_tokens=62, prompt="a photo of")
    with pytest.raises(ValueError, match="at most 61 after the prompt's 3 tokens"):
        over.load_model()


@pytest.mark.parametrize(("flags", "message"), [
    ({"blip_model": "http://evil/x"}, "--blip_model: 'http://evil/x' is not allowed"),
    ({"clip_model": "../../etc"}, "--clip_model: '../../etc' is not allowed"),
    ({"model_sources": "Salesforce/*"}, "is not among the allowed model sources: Salesforce/*"),
    ({"model_sources": "http://models"}, "model_sources: 'http://models' is not allowed here"),
    ({"source_roots": "relative/dir"}, "source_roots: 'relative/dir' is not allowed here"),
])
def test_the_job_refuses_untrusted_models_and_roots_before_reading(
        tmp_path: Path, run_job: Any, flags: dict[str, str], message: str) -> None:
    from captioning.options import CaptionOptionsError

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    with pytest.raises(CaptionOptionsError, match=message.replace("*", r"\*").replace(
            "?", r"\?").replace(".", r"\.")):
        run_job(manifest, tmp_path / "out", **flags)
    assert not (tmp_path / "out").exists()


def test_weights_load_without_executing_code(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """A model folder with only a pickle checkpoint is refused (safetensors only)."""
    import shutil

    import torch

    from captioning.model_handlers import ClipRankModelHandler

    folder = tmp_path / "pickled_clip"
    shutil.copytree(tiny_models["clip"], folder)
    state = ClipRankModelHandler(tiny_models["clip"]).load_model().model.state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        ClipRankModelHandler(str(folder)).load_model()
