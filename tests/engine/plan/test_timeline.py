"""Recording spans: wrapped stage methods for the chosen steps only, idle time derived, and
torch's own module state untouched."""


import numpy as np
import pytest
import torch
import torch.distributed.pipelining.schedules as torch_schedules
from torch import nn

from skpipe import PipeNetClassifier
from skpipe.engine.plan._timeline import Recorder, Span, Timeline


class FakeStage:
    def forward_one_chunk(self, mb, *args, **kwargs):
        return "f"

    def backward_one_chunk(self, mb, *args, full_backward=True, **kwargs):
        return "b"

    def backward_weight_one_chunk(self, mb, *args, **kwargs):
        return "w"


def test_recorder_wraps_for_one_step_then_restores_the_stage():
    stage = FakeStage()
    rec = Recorder(rank=1, stage_of=lambda c: c % 2)
    undo = rec.install({3: stage})
    assert stage.forward_one_chunk(0) == "f"
    assert stage.backward_one_chunk(0, full_backward=False) == "b"
    assert stage.backward_weight_one_chunk(0) == "w"
    undo()
    stage.forward_one_chunk(1)  # not recorded any more
    assert [(s.kind, s.chunk, s.rank, s.microbatch) for s in rec.spans] == [
        ("F", 3, 1, 0), ("I", 3, 1, 0), ("W", 3, 1, 0)]
    assert "forward_one_chunk" not in vars(stage)


def test_waits_are_the_gaps_between_a_ranks_compute_spans():
    spans = [Span(1, 0, 0, "F", 0, 0.0, 1.0), Span(1, 1, 1, "F", 0, 1.0, 2.0),
             Span(1, 1, 1, "B", 0, 2.0, 4.0), Span(1, 0, 0, "B", 0, 4.0, 6.0)]
    tl = Timeline(spans, n_stages=2, n_microbatches=1, chunks_per_stage=1, schedule="gpipe")
    waits = [(w.rank, w.start, w.end) for w in tl.waits()]
    assert waits == [(0, 1.0, 4.0), (1, 0.0, 1.0), (1, 4.0, 6.0)]
    # 12 s of rank-time, 6 s busy
    assert tl.measured_bubble() == pytest.approx(0.5)
    assert tl.theoretical_bubble == pytest.approx(0.5)


def test_recording_leaves_torchs_module_state_alone(classification_data):
    """The timeline used to replace a private function of torch's schedules module while
    recording, which every other pipeline in the process would then run through."""
    original = torch_schedules.__dict__.copy()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append({k: v for k, v in torch_schedules.__dict__.items() if original.get(k) is not v})
            return x

    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Probe(), nn.Linear(8, 3))
    est = PipeNetClassifier(module=net, n_stages=2, n_microbatches=2, launcher="local",
                            max_epochs=1, batch_size=16, timeline_steps=2).fit(*classification_data)
    assert est.timeline_.steps() == [1, 2]
    assert seen and all(changed == {} for changed in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_spans_time_the_kernels_not_their_launch():
    X = np.random.RandomState(0).normal(size=(512, 2048)).astype(np.float32)
    y = np.arange(512) % 3
    est = PipeNetClassifier(module__hidden_layer_sizes=(2048,) * 4, n_stages=2, n_microbatches=4,
                            launcher="local", devices=["cuda:0"], max_epochs=1, batch_size=512,
                            timeline_steps=1).fit(X, y)
    fwd = [s.end - s.start for s in est.timeline_.spans if s.kind == "F"]
    # a (128 x 2048) @ (2048 x 2048) chain takes far more than a launch (~10 us)
    assert np.median(fwd) > 50e-6
