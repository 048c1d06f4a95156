"""Keep Python's cyclic garbage collector off the objects that live as long as the process.

Importing Beam, torch and transformers and loading two models creates about 750,000 Python
objects that are never garbage. The collector still walks all of them: every time the heap
grows by a quarter it runs a full collection (eight of them, 1.1 s, in one 12-image run on
the benchmark box), and once more when the interpreter exits (1.2 s, after the job's work
is done). ``gc.freeze()`` moves the objects that exist into a generation the collector never
visits, which is what CPython documents it for; ``long_lived()`` pauses collection while
such objects are built and freezes them afterwards.

Nothing is computed differently. The cost: cyclic garbage created inside the block is not
reclaimed until the process ends (imports and model loading make little of it).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Pause cyclic collection inside the block, then freeze every object that exists.

    Nests and may be entered from several threads (two models loading at once): the
    collector comes back on when the last block ends, and only if it was on before the first.
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.freeze()
                if _was_enabled:
                    gc.enable()


def skip_final_collection() -> None:
    """Freeze everything now so the interpreter's exit does not walk it all once more.

    Call it when the process has nothing left to do but exit: finalizers of objects caught
    in reference cycles no longer run (files the job wrote are closed before this).
    """
    gc.freeze()
