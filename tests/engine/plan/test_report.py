"""The plan report as a user reads it: a table, a frame, a dict."""

import torch
from torch import nn

from skpipe.engine.plan._plan import make_plan
from tests.conftest import pipeline_config


def report(balance="uniform"):
    cfg = pipeline_config(schedule="interleaved_1f1b", balance=balance, launcher="spawn")
    net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 2))
    return make_plan(net, cfg, torch.randn(16, 8)).report()


def test_table_names_the_layout_and_each_chunk():
    rep = report()
    text = str(rep)
    assert text.splitlines()[0] == (
        "schedule 'interleaved_1f1b': 2 stage(s) x 2 chunk(s), 4 micro-batch(es) of 4 rows "
        "(batch padded to 16), launcher 'spawn' on ['cpu', 'cpu']")
    assert "0-1 Linear,ReLU" in text and "expected bubble: 11.1%" in text
    assert "predicted step time" not in text  # nothing was timed


def test_frame_and_dict_hold_the_figures():
    rep = report("time")
    frame = rep.to_frame()
    assert list(frame["stage"]) == [0, 1, 0, 1] and frame["n_layers"].sum() == 7
    assert frame["parameters"].sum() == 3 * 72 + 18
    assert (frame["fwd_bwd_ms"] > 0).all()
    d = rep.to_dict()
    assert d["predicted_step_ms"] > 0 and len(d["chunks"]) == 4
