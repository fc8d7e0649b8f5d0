"""Process-wide set-up the server does as it starts."""

from __future__ import annotations

import gc
import weakref

from smartserve.service import freeze_loaded_objects


class _Cycle:
    pass


def test_start_up_objects_are_frozen_and_garbage_is_not():
    """What start-up left alive is kept out of full collections; garbage is collected first, not kept for good."""
    garbage = _Cycle()
    garbage.itself = garbage
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() > 0
        assert gone() is None
    finally:
        gc.unfreeze()
