"""The worker protocol: every message has a handler, messages survive the wire, and asking every
rank gathers one reply per rank in rank order."""

import dataclasses

import numpy as np
import pytest

from skpipe.engine.workers import _protocol as P
from skpipe.engine.workers._worker_main import HANDLERS, Worker


def message_types():
    return [c for c in vars(P).values() if isinstance(c, type) and issubclass(c, P.Message)
            and c is not P.Message]


def test_every_message_but_close_has_a_handler():
    assert set(HANDLERS) == set(message_types()) - {P.Close}


def test_messages_round_trip_with_their_fields():
    step = P.Step(x=np.arange(6, dtype=np.float32).reshape(2, 3), y=None, n_real=2)
    back = P.decode(P.encode(step))
    assert isinstance(back, P.Step) and back.n_real == 2 and back.y is None
    np.testing.assert_array_equal(back.x, step.x)
    assert P.decode(P.encode(P.Failed("Traceback ..."))).traceback == "Traceback ..."


def test_setup_travels_by_value():
    class Local:  # a class pickle could not find by name
        pass

    setup = P.Setup(chunks={0: Local()}, config=None, spec=None, shapes=[(3,)], device="cpu", seed=1)
    assert isinstance(P.decode(P.encode(setup)).chunks[0], type(Local()))


def test_a_request_before_setup_is_refused():
    with pytest.raises(RuntimeError, match="got a request before its setup"):
        HANDLERS[P.Spans](Worker(0, 1), P.Spans())


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.RecordTimeline(steps=2).steps = 3  # type: ignore[misc]


@pytest.mark.distributed
def test_ask_all_gathers_one_reply_per_rank_in_rank_order():
    from skpipe.engine.workers._pool import WorkerGroup

    group = WorkerGroup(2, ("cpu", "cpu"), timeout=60)
    try:
        assert group.ask_all(P.Reset()) == [None, None]
        with pytest.raises(Exception, match="got a request before its setup"):
            group.ask_all(P.Spans())
    finally:
        group.close()
