"""URI helpers: Beam FileSystems takes plain local paths, not ``file://`` URIs.

URIs in this system are never percent-encoded (contract: manifest): ``file:///a/b c#1.jpg``
names the file ``/a/b c#1.jpg``, just as ``gs://bucket/b c#1.jpg`` names that object. So
``file://`` is stripped, never URL-parsed: ``#`` is not a fragment, ``?`` not a query and
``%20`` not a space, and every file name round-trips exactly.

Local image files are opened with :func:`open_regular` (the job's reads and the Hugging Face
export): regular files only, and the open itself never waits (a FIFO would wait for a writer
forever, a device or socket is no picture).

A ``gs://`` object the plan listed with its generation is read at that generation
(:func:`read_gcs_generation`): an object overwritten since the plan is read as it was
planned where that generation is kept (object versioning), else :class:`GenerationGone`.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, BinaryIO

FILE_SCHEME = "file://"

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symbolic link"))


class NotARegularFile(OSError):
    """A local path that is not a regular file (FIFO, socket, device, directory...)."""


def _not_regular(path: str, mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return f"{path!r} is not a regular file ({kind}); only regular files are read"


def not_regular_reason(path: str) -> str | None:
    """Why ``path`` (symlinks followed) is not a regular file, from ``os.stat`` without
    opening it; None when it is one. Raises OSError (FileNotFoundError...) as ``os.stat``."""
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else _not_regular(path, mode)


def open_regular(path: str, *, follow_symlinks: bool = True) -> BinaryIO:
    """Open the local regular file ``path`` for reading (binary, buffered).

    Checked with ``os.stat`` before the open, opened with ``O_NONBLOCK`` (so that even a
    FIFO put there between the check and the open cannot block the open) and checked again
    on what was opened; then the flag is cleared and the file reads normally. Raises
    :class:`NotARegularFile`, or the OSError of the stat or open (``follow_symlinks=False``:
    ELOOP when the last component is a symlink).
    """
    if reason := not_regular_reason(path):
        raise NotARegularFile(reason)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(_not_regular(path, mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def beam_path(uri: str) -> str:
    """``file:///x/y`` -> ``/x/y`` (verbatim); every other URI or path unchanged."""
    if uri.startswith(FILE_SCHEME):
        return uri[len(FILE_SCHEME):] or "/"
    return uri


def file_uri(path: str) -> str:
    """The ``file://`` URI of an absolute local path, verbatim (no percent-encoding)."""
    return f"{FILE_SCHEME}{path}"


class GenerationGone(FileNotFoundError):
    """The planned generation of a ``gs://`` object is no longer there (the object was
    overwritten or deleted since the plan, and no older version is kept)."""


_GCS = threading.local()


def _gcsio() -> Any:
    """This thread's Beam ``GcsIO``, built once from the pipeline's options as Beam's own
    GCS filesystem builds one (credentials, project, retries, custom audit headers)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp import gcsio
    from apache_beam.options.value_provider import RuntimeValueProvider

    options = FileSystems._pipeline_options or RuntimeValueProvider.runtime_options
    cached = getattr(_GCS, "io", None)
    if cached is None or cached[0] is not options:
        cached = (options, gcsio.GcsIO(pipeline_options=options))
        _GCS.io = cached
    return cached[1]


def read_gcs_generation(uri: str, generation: int, max_bytes: int) -> bytes:
    """The first ``max_bytes + 1`` bytes of the ``gs://`` object ``uri`` at ``generation``:
    one ranged request for that generation's raw bytes (as listed and hashed, never
    transcoded). Raises :class:`GenerationGone` when that generation no longer exists;
    other errors as Cloud Storage raises them (retried as the client retries)."""
    from apache_beam.io.gcp import gcsio
    from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

    bucket, name = gcsio.parse_gcs_path(uri)
    blob = _gcsio().client.bucket(bucket).blob(name, generation=int(generation))
    try:
        return blob.download_as_bytes(start=0, end=max_bytes, raw_download=True,
                                      checksum=None)
    except NotFound:
        raise GenerationGone(f"{uri} generation {generation} no longer exists") from None
    except RequestRangeNotSatisfiable:  # bytes 0-N of that generation: it is empty
        return b""
