"""Checkpoints: the whole network and every stage's optimizer, resumed exactly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback
from sklearn.model_selection import GridSearchCV

import skpipe
from skpipe import PipeNetClassifier
from skpipe.callbacks import Checkpoint, LoadInitState


class CrashAt(Callback):
    """Stands in for a machine that dies after the checkpoint of epoch ``epoch`` was written
    (as the next epoch begins: a checkpoint is written once every callback ended its epoch)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, net, **kw):
        if len(net.history) == self.epoch + 1:
            raise RuntimeError("simulated crash")


def make(tmp_path, extra=(), **kw):
    ckpt = Checkpoint(str(tmp_path / "ckpt"))
    p = dict(module__hidden_layer_sizes=(12, 12), module__activation="tanh", max_epochs=6,
             batch_size=16, lr=0.01, random_state=0, callbacks=[ckpt, LoadInitState(ckpt), *extra])
    p.update(kw)
    return PipeNetClassifier(**p)


CONFIGS = [
    dict(),
    dict(n_stages=2, n_microbatches=2, launcher="local"),
    pytest.param(dict(n_stages=2, n_microbatches=4, launcher="spawn", schedule="zbv"),
                 marks=pytest.mark.distributed),
    pytest.param(dict(n_stages=2, n_replicas=2, n_microbatches=2, launcher="spawn"),
                 marks=pytest.mark.distributed, id="replicas"),
    # the asynchronous schedules: each stage's stashed weight versions and the fit's batch
    # count are saved too (2bw's next batch runs on the version before the last update;
    # pipedream's first stage p - 1 updates behind)
    pytest.param(dict(n_stages=3, n_microbatches=3, launcher="spawn", schedule="2bw"),
                 marks=pytest.mark.distributed, id="2bw"),
    pytest.param(dict(n_stages=3, n_microbatches=2, launcher="spawn", schedule="pipedream"),
                 marks=pytest.mark.distributed, id="pipedream"),
    # tensor shards and sharded replicas: each stage's part written whole by its owner (the
    # shards gathered one tensor at a time), read back into shards (Adam's moments included)
    pytest.param(dict(n_stages=2, n_microbatches=2, launcher="spawn", tensor_parallel=2),
                 marks=pytest.mark.distributed, id="tensor_parallel"),
    pytest.param(dict(n_stages=1, n_replicas=2, launcher="spawn", shard="full"),
                 marks=pytest.mark.distributed, id="shard-full"),
    pytest.param(dict(n_stages=2, n_replicas=2, n_microbatches=2, launcher="spawn",
                      shard="optimizer"), marks=pytest.mark.distributed, id="shard-optimizer"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_after_crash_equals_uninterrupted(tmp_path, classification_data, config):
    X, y = classification_data
    full = PipeNetClassifier(module__hidden_layer_sizes=(12, 12), module__activation="tanh",
                             max_epochs=6, batch_size=16, lr=0.01, random_state=0, **config).fit(X, y)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path, extra=[CrashAt(4)], **config).fit(X, y)
    resumed = make(tmp_path, **config).fit(X, y)
    assert len(resumed.history_) == 6
    for (k, a), b in zip(resumed.module_.state_dict().items(), full.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    np.testing.assert_allclose(resumed.history_[:, "train_loss"], full.history_[:, "train_loss"], atol=1e-6)
    skpipe.shutdown_workers()


def test_checkpoint_files_load_with_weights_only(tmp_path, classification_data):
    est = make(tmp_path, max_epochs=2).fit(*classification_data)
    files = sorted(os.path.basename(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path)
                   for f in fs)
    assert files == ["checkpoint.pt", "state-epoch2.pt"]  # the last epoch's part only
    folder = os.path.dirname(est.callbacks[0].path_)
    payload = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert payload["epoch"] == 2 and payload["parts"] == ["state-epoch2.pt"]
    part = torch.load(os.path.join(folder, "state-epoch2.pt"), weights_only=True)
    assert set(part["module"]) == set(est.module_.state_dict())


@pytest.mark.distributed
def test_each_stage_writes_its_own_part_and_they_make_one_network(tmp_path, classification_data):
    X, y = classification_data
    est = make(tmp_path, max_epochs=3, n_stages=2, n_microbatches=2, launcher="spawn")
    est.fit(X, y)
    folder = os.path.dirname(est.callbacks[0].path_)
    assert sorted(os.listdir(folder)) == ["checkpoint.pt", "stage0-epoch3.pt", "stage1-epoch3.pt"]
    whole = est.module_.state_dict()
    seen = set()
    for stage in (0, 1):
        part = torch.load(os.path.join(folder, f"stage{stage}-epoch3.pt"), weights_only=True)
        # a part holds its stage's tensors only, with the trained values
        assert part["module"] and not set(part["module"]) & seen
        seen |= set(part["module"])
        for name, value in part["module"].items():
            torch.testing.assert_close(value, whole[name], rtol=0, atol=0)
        assert set(part["optimizer"]["state"]) == {
            n for n in part["module"] if n in dict(est.module_.named_parameters())
        }
    assert seen == set(whole)
    # turned into one network, anywhere
    saved = skpipe.callbacks.read_checkpoint(folder)
    assert saved["epoch"] == 3 and len(saved["history"]) == 3
    fresh = type(est.module_)(n_features_in=X.shape[1], n_outputs=len(est.classes_),
                              hidden_layer_sizes=(12, 12),
                              activation="tanh")
    fresh.load_state_dict(saved["module"])
    with torch.no_grad():
        np.testing.assert_allclose(fresh.eval()(torch.from_numpy(X.astype(np.float32))).numpy(),
                                   est.forward_pipelined(X), atol=1e-5)
    skpipe.shutdown_workers()


def test_layout_mismatch_is_refused(tmp_path, classification_data):
    X, y = classification_data
    make(tmp_path, max_epochs=2, n_stages=2, n_microbatches=2, launcher="local").fit(X, y)
    ckpt = Checkpoint(str(tmp_path / "ckpt"))
    est = make(tmp_path, max_epochs=2, n_stages=2, n_microbatches=2, launcher="local", balance=[1, 4])
    # a different balance is a different fit (fingerprint), so nothing is resumed ...
    est.fit(X, y)
    # ... and a checkpoint whose layout disagrees with the fit is refused, naming both
    loader = LoadInitState(ckpt)
    with pytest.raises(ValueError, match="pipeline layout"):
        loader.load(est.callbacks[0].path_.split(os.sep)[-2], {"n_stages": 4})


def test_grid_search_fits_write_to_their_own_paths(tmp_path, classification_data):
    X, y = classification_data
    est = make(tmp_path, max_epochs=1)
    GridSearchCV(est, {"lr": [0.01, 0.02]}, cv=3, n_jobs=2).fit(X, y)
    dirs = os.listdir(tmp_path / "ckpt")
    assert len(dirs) == 2 * 3 + 1  # every candidate x fold, and the refit


@pytest.mark.distributed
def test_killed_fit_resumes_from_its_last_checkpoint(tmp_path, classification_data):
    X, y = classification_data
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np, time
        from skorch.callbacks import Callback
        from skpipe import PipeNetClassifier
        from skpipe.callbacks import Checkpoint, LoadInitState

        class Slow(Callback):
            def on_epoch_end(self, net, **kw):
                print("epoch", len(net.history), flush=True)
                time.sleep(0.5 if len(net.history) < 3 else 1000)

        X, y = np.load({str(tmp_path / 'X.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        ckpt = Checkpoint({str(tmp_path / 'ckpt')!r})
        PipeNetClassifier(module__hidden_layer_sizes=(12, 12), module__activation="tanh",
                          max_epochs=6, batch_size=16, lr=0.01, random_state=0, n_stages=2,
                          n_microbatches=2, launcher="spawn",
                          callbacks=[ckpt, LoadInitState(ckpt), Slow()]).fit(X, y)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    for line in proc.stdout:
        if line.strip() == "epoch 3":
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = make(tmp_path, n_stages=2, n_microbatches=2, launcher="spawn").fit(X, y)
    full = PipeNetClassifier(module__hidden_layer_sizes=(12, 12), module__activation="tanh",
                             max_epochs=6, batch_size=16, lr=0.01, random_state=0).fit(X, y)
    for a, b in zip(resumed.module_.state_dict().values(), full.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    skpipe.shutdown_workers()


class EpochsRun(Callback):
    """Which epochs this fit itself ran (a resumed fit runs only those left)."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, net, **kw):
        self.epochs.append(len(net.history))


def test_fit_seeded_with_a_random_state_finds_its_checkpoint(tmp_path, classification_data):
    """The fingerprint hashed repr(value): a RandomState's repr holds its memory address."""
    X, y = classification_data
    rs = np.random.RandomState
    full = PipeNetClassifier(module__hidden_layer_sizes=(12, 12), module__activation="tanh",
                             max_epochs=6, batch_size=16, lr=0.01, random_state=rs(0)).fit(X, y)
    crashed_rng = rs(0)  # kept alive: the resumed fit's generator lives at another address
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path, extra=[CrashAt(4)], random_state=crashed_rng).fit(X, y)
    ran = EpochsRun()
    resumed = make(tmp_path, extra=[ran], random_state=rs(0)).fit(X, y)
    assert ran.epochs == [5, 6]
    for a, b in zip(resumed.module_.state_dict().values(), full.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_time_balanced_fit_resumes_when_the_measured_split_changes(tmp_path, classification_data, monkeypatch):
    """Timing noise can move a balance='time' split between a fit and its resumption; the saved
    optimizer state is keyed by parameter name, so the new split takes it."""
    from skpipe.engine.split import _partition

    X, y = classification_data
    common = dict(module__hidden_layer_sizes=(12, 12), module__activation="tanh", max_epochs=6,
                  batch_size=16, lr=0.01, random_state=0)
    full = PipeNetClassifier(**common).fit(X, y)
    kw = dict(n_stages=2, n_microbatches=2, launcher="local", balance="time")
    monkeypatch.setattr(_partition, "time_costs", lambda layers, *a, **k: [10.0, 1, 1, 1, 1])
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path, extra=[CrashAt(4)], **kw).fit(X, y)
    monkeypatch.setattr(_partition, "time_costs", lambda layers, *a, **k: [1.0, 1, 1, 1, 10])
    ran = EpochsRun()
    resumed = make(tmp_path, extra=[ran], **kw).fit(X, y)
    assert [c.n_layers for c in resumed.plan_.chunks] == [4, 1]  # not the saved fit's [1, 4]
    assert ran.epochs == [5, 6]
    for a, b in zip(resumed.module_.state_dict().values(), full.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [
    dict(),
    pytest.param(dict(n_stages=2, n_microbatches=2, launcher="spawn"),
                 marks=pytest.mark.distributed),
])
@pytest.mark.parametrize("step_every", ["epoch", "batch"])
def test_resume_continues_the_lr_schedule(tmp_path, classification_data, config, step_every):
    """The schedulers' state and the optimizer's settings are in the checkpoint: a resumed fit
    follows the learning rates of the uninterrupted one (the scheduler is listed before
    LoadInitState, so it is built before the state comes back, and still continues)."""
    from skorch.callbacks import LRScheduler

    X, y = classification_data

    def schedule():
        return LRScheduler(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=5,
                           step_every=step_every)

    full = make(tmp_path / "full", extra=[schedule()], **config)
    full.callbacks = [schedule()]  # no checkpoint
    full.fit(X, y)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path, extra=[schedule(), CrashAt(4)], **config).fit(X, y)
    resumed = make(tmp_path, **config)
    resumed.callbacks = [schedule(), *resumed.callbacks]
    resumed.fit(X, y)
    np.testing.assert_allclose(resumed.history_[:, "train_loss"], full.history_[:, "train_loss"],
                               atol=1e-6)
    for (k, a), b in zip(resumed.module_.state_dict().items(), full.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    skpipe.shutdown_workers()


TORCHRUN_RESUME = """
import os, sys
import numpy as np, torch.distributed as dist
from skpipe import PipeNetClassifier
from tests.test_checkpoints import CrashAt, make
from pathlib import Path
dist.init_process_group("gloo")
rng = np.random.RandomState(0)
X = rng.normal(size=(120, 6)).astype(np.float32); y = rng.randint(0, 3, size=120)
for schedule, m in (("1f1b", 2), ("2bw", 2), ("pipedream", 2)):
    config = dict(n_stages=2, n_microbatches=m, schedule=schedule)
    folder = Path(sys.argv[1]) / schedule
    full = PipeNetClassifier(module__hidden_layer_sizes=(12, 12), module__activation="tanh",
                             max_epochs=6, batch_size=16, lr=0.01, random_state=0,
                             **config).fit(X, y)
    try:
        make(folder, extra=[CrashAt(4)], **config).fit(X, y)
        raise AssertionError("the crash did not happen")
    except RuntimeError as e:
        assert "simulated crash" in str(e), e
    resumed = make(folder, **config).fit(X, y)
    assert resumed.config_.launcher == "torchrun" and len(resumed.history_) == 6
    diff = max(float((a - b).abs().max()) for a, b in zip(
        resumed.module_.state_dict().values(), full.module_.state_dict().values()))
    loss = float(np.abs(np.subtract(resumed.history_[:, "train_loss"],
                                    full.history_[:, "train_loss"])).max())
    os.write(1, f"rank {dist.get_rank()} {schedule} difference {max(diff, loss):.3g}\\n".encode())
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_torchrun_ranks_resume_after_crash_equal_uninterrupted(tmp_path):
    """Under torchrun each rank writes and reads its stage's part (for 2bw and pipedream with
    its stashed weight versions): the resumed fit equals the uninterrupted one."""
    from pathlib import Path

    from tests.test_examples import free_port

    script = tmp_path / "resume.py"
    script.write_text(TORCHRUN_RESUME)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
           str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert sorted((r[1], r[2]) for r in lines) == sorted(
        (str(rank), s) for rank in (0, 1) for s in ("1f1b", "2bw", "pipedream")), out.stdout
    assert max(float(r[-1]) for r in lines) < 1e-6, out.stdout
