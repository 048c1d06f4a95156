"""Export captions as a Hugging Face ``datasets`` imagefolder.

Layout: ``<out>/metadata.jsonl`` (``file_name``, ``text``, ``image_id``,
``caption_score``) beside the images, named ``<image_id><ext>`` so names are stable
across runs and never collide. Load it with
``datasets.load_dataset("imagefolder", data_dir=<out>)``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from typing import Any

from caption_platform.storage import is_local, storage_path


def _extension(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return f".{name.rpartition('.')[2].lower()}" if "." in name else ""


def export_hf_imagefolder(
    rows: Iterable[dict[str, Any]],
    out_uri: str,
    *,
    copy_images: bool = True,
    conn_id: str | None = None,
) -> int:
    """Write the imagefolder for ``rows`` (captions rows) under ``out_uri``; return rows written.

    With ``copy_images=False`` only ``metadata.jsonl`` is written (the caller puts
    the images in place under the same ``file_name``).
    """
    out = storage_path(out_uri, conn_id)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    written = 0
    with (out / "metadata.jsonl").open("w", encoding="utf-8") as meta:
        for row in rows:
            image_id = str(row["image_id"])
            file_name = f"{image_id}{_extension(str(row['uri']))}"
            if copy_images:
                source = storage_path(str(row["uri"]), conn_id)
                with source.open("rb") as src, (out / file_name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            record = {
                "file_name": file_name,
                "text": row["caption"],
                "image_id": image_id,
                "caption_score": row.get("caption_score"),
            }
            meta.write(json.dumps(record) + "\n")
            written += 1
    return written
