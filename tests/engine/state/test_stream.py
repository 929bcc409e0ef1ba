"""Tensors streamed as raw bytes, straight into their own memory."""

import os
import socket
import threading

import pytest
import torch

from skpipe.engine.state._stream import join_tensors, read_tensors, slots, split_tensors, write_tensors


def test_tensors_stream_through_a_socket_into_their_own_memory():
    payload = {
        0: {"weight": torch.randn(300, 70), "bias": torch.randn(70).to(torch.bfloat16)},
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(20.0).reshape(4, 5).t(),  # not contiguous
        "flags": torch.tensor([True, False]),
        "hyper": {"lr": 0.1, "betas": (0.9, 0.99)},
    }
    skeleton, tensors = split_tensors(payload)
    a, b = socket.socketpair()
    writer = threading.Thread(target=write_tensors, args=(a.fileno(), tensors))
    writer.start()
    got = read_tensors(b.fileno(), slots(skeleton))
    writer.join()
    a.close()
    b.close()
    back = join_tensors(skeleton, got)
    assert back["hyper"] == {"lr": 0.1, "betas": (0.9, 0.99)}
    for key in ("steps", "empty", "strided", "flags"):
        assert back[key].dtype == payload[key].dtype
        torch.testing.assert_close(back[key], payload[key], rtol=0, atol=0)
    torch.testing.assert_close(back[0]["bias"], payload[0]["bias"], rtol=0, atol=0)
    torch.testing.assert_close(back[0]["weight"], payload[0]["weight"], rtol=0, atol=0)


def test_a_sender_that_closes_midway_is_an_error():
    a, b = socket.socketpair()
    os.write(a.fileno(), b"\0" * 10)
    a.close()
    skeleton, _ = split_tensors({"w": torch.zeros(100)})
    with pytest.raises(EOFError):
        read_tensors(b.fileno(), slots(skeleton))
    b.close()
