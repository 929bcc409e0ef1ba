import pytest

from skpipe.engine.plan import _schedules as S
from tests.conftest import pipeline_config as config


def test_every_torch_schedule_is_named():
    import torch.distributed.pipelining.schedules as ts

    for spec in S.SCHEDULES.values():
        if not spec.asynchronous:
            assert hasattr(ts, spec.torch_class)
    assert S.ASYNC_SCHEDULE_NAMES == ("2bw", "pipedream")  # skpipe's own: torch has no class
    assert set(S.SCHEDULE_NAMES) == {
        "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv",
        "dualpipev",
    }


@pytest.mark.parametrize("placement,p,v", [("loop", 2, 2), ("loop", 4, 3), ("v", 2, 2), ("v", 4, 2)])
def test_placement_gives_each_rank_its_chunks(placement, p, v):
    owners = [S.chunk_owner(c, p, v, placement) for c in range(p * v)]
    for rank in range(p):
        assert owners.count(rank) == v
        assert S.chunks_of_rank(rank, p, v, placement) == [c for c, o in enumerate(owners) if o == rank]


def test_v_placement_puts_first_and_last_chunk_on_rank_0():
    assert S.chunk_owner(0, 4, 2, "v") == 0
    assert S.chunk_owner(7, 4, 2, "v") == 0
    assert [S.chunk_owner(c, 4, 2, "v") for c in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]


def test_bubble_formula():
    assert S.bubble_fraction("gpipe", 4, 16, 1) == pytest.approx(3 / 19)
    assert S.bubble_fraction("interleaved_1f1b", 4, 16, 2) == pytest.approx(3 / 35)
    assert S.bubble_fraction("1f1b", 1, 8, 1) == 0.0
    assert S.theoretical_step_time("gpipe", 4, 16, 1, 0.01, 0.02) == pytest.approx(19 * 0.03)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(schedule="1f1b", n_stages=4, devices=("cpu",) * 4, n_microbatches=2), r"n_microbatches \(2\) must be >= n_stages \(4\)"),
        (dict(schedule="dualpipev", n_microbatches=2), r"n_microbatches \(2\) must be >= the number of model chunks \(4"),
        (dict(schedule="interleaved_1f1b", chunks_per_stage=1), r"chunks_per_stage \(1\) is not allowed for schedule 'interleaved_1f1b'"),
        (dict(schedule="zbv", chunks_per_stage=3), r"chunks_per_stage \(3\).*exactly 2"),
        (dict(schedule="gpipe", chunks_per_stage=2), r"chunks_per_stage \(2\).*'gpipe'"),
        (dict(n_microbatches=32, batch_size=16), r"n_microbatches \(32\) must be <= batch_size \(16\)"),
        (dict(schedule="interleaved_zero_bubble", n_stages=2, n_microbatches=5), r"multiple of the number of rounds \(2"),
        (dict(balance=(1, 2, 3)), r"balance \[1, 2, 3\] has 3 entries but the pipeline has 2 chunks"),
        (dict(schedule="pipedream2"), r"schedule 'pipedream2' is not one of"),
    ],
)
def test_bad_combinations_name_the_values(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


@pytest.mark.parametrize("schedule", S.SCHEDULE_NAMES)
@pytest.mark.parametrize("p", [2, 4])
def test_auto_microbatches_is_accepted(schedule, p):
    cfg = config(schedule=schedule, n_stages=p, devices=("cpu",) * p, n_microbatches="auto", batch_size=64)
    assert cfg.n_microbatches in (4 * p, 2 * p, p)
    assert cfg.batch_rows % cfg.n_microbatches == 0


def test_ragged_batch_rows_round_up():
    cfg = config(n_microbatches=4, batch_size=10)
    assert cfg.batch_rows == 12 and cfg.microbatch_rows == 3
