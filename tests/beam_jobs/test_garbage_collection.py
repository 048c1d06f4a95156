"""captioning.garbage_collection pauses the cyclic collector and freezes what was built."""

from __future__ import annotations

import gc

import pytest

from captioning.garbage_collection import long_lived, skip_final_collection


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    if was:
        gc.enable()
    else:
        gc.disable()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_long_lived_pauses_collection_then_freezes_what_was_built():
    gc.enable()
    gc.unfreeze()
    with long_lived():
        assert not gc.isenabled()
        built = _Node()
    assert gc.isenabled()
    assert not any(o is built for o in gc.get_objects())  # frozen: never walked again
    later = _Node()
    assert any(o is later for o in gc.get_objects())  # made afterwards: collected as usual


def test_nested_and_overlapping_blocks_reenable_once_at_the_end():
    gc.enable()
    with long_lived():
        with long_lived():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block is still building
    assert gc.isenabled()


def test_collector_stays_off_when_it_was_off_before():
    gc.disable()
    with long_lived():
        pass
    assert not gc.isenabled()


def test_exception_inside_the_block_still_restores_the_collector():
    gc.enable()
    with pytest.raises(RuntimeError), long_lived():
        raise RuntimeError("load failed")
    assert gc.isenabled()


def test_skip_final_collection_freezes_every_tracked_object():
    gc.unfreeze()
    node = _Node()
    assert any(o is node for o in gc.get_objects())  # tracked, in a generation to walk
    skip_final_collection()
    assert gc.get_freeze_count() > 0
    # frozen: in the permanent generation, which no collection walks (not a count of the
    # youngest generation: another thread of the test process may allocate meanwhile)
    assert not any(o is node for o in gc.get_objects())
