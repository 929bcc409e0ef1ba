"""Many machines, on one: two torchrun agents as two "nodes" (c10d rendezvous), and a grid
search of pipelined candidates spread over a Dask cluster's worker processes."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import wait_no_workers
from tests.test_examples import free_port

pytestmark = pytest.mark.distributed

TWO_NODES = """
import os, sys
import numpy as np, torch.distributed as dist
from skorch.callbacks import Freezer, LRScheduler
from skpipe import PipeNetClassifier
n_replicas = int(sys.argv[1])
dist.init_process_group("gloo")
rng = np.random.RandomState(0)
X = rng.normal(size=(90, 6)).astype(np.float32); y = rng.randint(0, 3, size=90)
kw = dict(module__hidden_layer_sizes=(16, 16, 16), module__activation="tanh", lr=0.01,
          max_epochs=3, batch_size=13, random_state=0)
one = PipeNetClassifier(**kw).fit(X, y)
# with replicas, every schedule (with the micro-batch count it accepts for 7-row shares)
cases = {"1f1b": 4, "auto": "auto"} if n_replicas == 1 else {
    "gpipe": 4, "1f1b": 2, "interleaved_1f1b": 2, "looped_bfs": 4,
    "interleaved_zero_bubble": 2, "zbv": 2, "dualpipev": 4}
for schedule, m in cases.items():
    piped = PipeNetClassifier(n_stages=2, n_replicas=n_replicas, n_microbatches=m,
                              schedule=schedule, **kw).fit(X, y)   # launcher 'auto'
    diff = max(float((a - b).abs().max()) for a, b in zip(piped.module_.state_dict().values(),
                                                           one.module_.state_dict().values()))
    loss = abs(piped.history_[-1, "train_loss"] - one.history_[-1, "train_loss"])
    # one write per line: the node's ranks share its log
    name = schedule if schedule != "auto" else "auto:" + piped.config_.schedule  # rank 0's choice
    os.write(1, (f"node {os.environ['GROUP_RANK']} rank {dist.get_rank()} {name} launcher "
                 f"{piped.config_.launcher} difference {max(diff, loss):.3g}\\n").encode())
# the training recipe on torchrun: an LR schedule and a callback that writes the weights
def recipe():
    return [LRScheduler("StepLR", step_size=1, gamma=0.5), Freezer(["0.*"])]
one = PipeNetClassifier(callbacks=recipe(), **kw).fit(X, y)
piped = PipeNetClassifier(n_stages=2, n_replicas=n_replicas, n_microbatches=2,
                          callbacks=recipe(), **kw).fit(X, y)
diff = max(float((a - b).abs().max()) for a, b in zip(piped.module_.state_dict().values(),
                                                       one.module_.state_dict().values()))
os.write(1, (f"node {os.environ['GROUP_RANK']} rank {dist.get_rank()} callbacks launcher "
             f"{piped.config_.launcher} difference {diff:.3g}\\n").encode())
dist.destroy_process_group()
"""


def isolated_network() -> list[str]:
    """``unshare -n`` (a network namespace with loopback only) where the kernel allows it, so
    that torch's rendezvous stores, which listen on every interface, reach nothing beyond."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n"]
    return []


def run_two_agents(tmp_path, code: str, nproc: int, *args: str) -> list[str]:
    """Run ``code`` under two torchrun agents ("nodes") of ``nproc`` processes each, meeting at
    a c10d rendezvous on loopback; the two nodes' logs (the test fails with them otherwise)."""
    script = tmp_path / "job.py"
    script.write_text(code)
    port = free_port()
    agent = (f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node {nproc} "
             f"--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id skpipe-two-nodes "
             f"{script} {' '.join(args)}")
    shell = textwrap.dedent(f"""
        {'ip link set lo up' if isolated_network() else 'true'}
        export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
        {agent} > {tmp_path}/node_a.txt 2>&1 & a=$!
        {agent} > {tmp_path}/node_b.txt 2>&1 & b=$!
        wait $a; ra=$?; wait $b; rb=$?
        exit $((ra + rb))
    """)
    out = subprocess.run([*isolated_network(), "bash", "-c", shell], capture_output=True,
                         text=True, timeout=600)
    logs = [(tmp_path / f"node_{n}.txt").read_text() for n in "ab"]
    assert out.returncode == 0, "\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.parametrize("n_replicas", [1, 2], ids=["pipeline", "2-replicas"])
def test_two_torchrun_agents_as_two_nodes_train_like_one_device(tmp_path, n_replicas):
    """Two nodes: one stage each (the pipeline spans them), or with two replicas of a
    2-stage pipeline, one replica per node (rank = replica x 2 + stage), every schedule."""
    logs = run_two_agents(tmp_path, TWO_NODES, n_replicas, str(n_replicas))
    lines = [line for log in logs for line in log.splitlines() if line.startswith("node ")]
    # with one replica: 1f1b, and the planner's pick; and the fit with callbacks
    n_schedules = (2 if n_replicas == 1 else 7) + 1
    ranks = {(line.split()[1], line.split()[3]) for line in lines}
    shown = "\n".join(log[-3000:] for log in logs)
    # two nodes; each holds n_replicas ranks (with replicas: the ranks of one replica)
    assert ranks == {(str(r // n_replicas), str(r)) for r in range(2 * n_replicas)}, shown
    assert len(lines) == 2 * n_replicas * n_schedules, shown
    assert len({line.split()[4] for line in lines}) == n_schedules, shown
    assert all("launcher torchrun" in line for line in lines)
    assert max(float(line.rsplit(" ", 1)[1]) for line in lines) < 1e-5


THREE_D = """
import os
import numpy as np, torch.distributed as dist
from skpipe import PipeNetClassifier
dist.init_process_group("gloo")
rng = np.random.RandomState(0)
X = rng.normal(size=(90, 6)).astype(np.float32); y = rng.randint(0, 3, size=90)
kw = dict(module__hidden_layer_sizes=(16, 16, 16), module__activation="tanh", lr=0.01,
          max_epochs=2, batch_size=13, random_state=0)
one = PipeNetClassifier(**kw).fit(X, y)
for schedule, shard, m in [("1f1b", "none", 2), ("interleaved_1f1b", "full", 2),
                           ("gpipe", "optimizer", 4)]:
    piped = PipeNetClassifier(n_stages=2, n_replicas=2, tensor_parallel=2, shard=shard,
                              n_microbatches=m, schedule=schedule, **kw).fit(X, y)
    diff = max(float((a - b).abs().max()) for a, b in zip(piped.module_.state_dict().values(),
                                                           one.module_.state_dict().values()))
    loss = abs(piped.history_[-1, "train_loss"] - one.history_[-1, "train_loss"])
    os.write(1, (f"node {os.environ['GROUP_RANK']} rank {dist.get_rank()} {schedule}-{shard} "
                 f"launcher {piped.config_.launcher} difference {max(diff, loss):.3g}\\n").encode())
dist.destroy_process_group()
"""


def test_replicas_stages_and_tensor_shards_under_two_torchrun_agents(tmp_path):
    """2 replicas x 2 stages x 2 tensor shards = 8 ranks on two "nodes" of 4: each node holds
    one replica, a stage's two shards side by side in it (the tensor group inside a node)."""
    logs = run_two_agents(tmp_path, THREE_D, 4)
    shown = "\n".join(log[-3000:] for log in logs)
    lines = [line for log in logs for line in log.splitlines() if line.startswith("node ")]
    assert len(lines) == 8 * 3, shown
    assert {(line.split()[1], line.split()[3]) for line in lines} == {
        (str(r // 4), str(r)) for r in range(8)}, shown
    assert all("launcher torchrun" in line for line in lines)
    assert max(float(line.rsplit(" ", 1)[1]) for line in lines) < 1e-5, shown


def test_grid_search_on_a_dask_cluster_equals_the_sequential_search(tmp_path):
    distributed = pytest.importorskip("distributed")
    import joblib
    from sklearn.model_selection import GridSearchCV
    from skorch.callbacks import Callback

    from skpipe import PipeNetClassifier

    log = tmp_path / "fits"

    class WhereItRan(Callback):  # defined here, so it travels to the Dask workers by value
        def on_train_begin(self, net, **kw):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    rng = np.random.RandomState(0)
    X, y = rng.normal(size=(90, 6)), rng.randint(0, 3, 90)
    est = PipeNetClassifier(module__hidden_layer_sizes=(8, 8), max_epochs=2, batch_size=16,
                            n_stages=2, n_microbatches=2, launcher="spawn", random_state=0,
                            callbacks=[WhereItRan()])
    grid = {"lr": [0.01, 0.03], "schedule": ["gpipe", "1f1b"]}
    sequential = GridSearchCV(est, grid, cv=2).fit(X, y)
    log.unlink()
    # worker processes (the default), on loopback, no dashboard
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            spread = GridSearchCV(est, grid, cv=2, n_jobs=-1).fit(X, y)
        dask_pids = list(client.run(os.getpid).values())
    assert len(set(dask_pids)) == 2 and os.getpid() not in dask_pids
    fit_pids = [int(line) for line in log.read_text().split()]
    assert len(fit_pids) == 4 * 2 + 1  # 4 candidates x 2 folds, and the refit (here)
    assert sum(pid in dask_pids for pid in fit_pids) == 8  # the candidates ran on the cluster
    np.testing.assert_array_equal(spread.cv_results_["mean_test_score"],
                                  sequential.cv_results_["mean_test_score"])
    assert spread.best_params_ == sequential.best_params_
    for pid in dask_pids:  # the candidates' stage workers went with the Dask workers
        assert wait_no_workers(pid) == []
    import skpipe

    skpipe.shutdown_workers()


RAY_SEARCH = """
import os, sys, numpy as np, joblib, ray
from ray.util.joblib import register_ray
from sklearn.model_selection import GridSearchCV
from skorch.callbacks import Callback
from skpipe import PipeNetClassifier

log = sys.argv[1]

class WhereItRan(Callback):  # travels to Ray's workers by value
    def on_train_begin(self, net, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")

rng = np.random.RandomState(0)
X, y = rng.normal(size=(90, 6)), rng.randint(0, 3, 90)
est = PipeNetClassifier(module__hidden_layer_sizes=(8, 8), max_epochs=2, batch_size=16,
                        n_stages=2, n_microbatches=2, launcher="spawn", random_state=0,
                        callbacks=[WhereItRan()])
grid = {"lr": [0.01, 0.03], "n_replicas": [1, 2]}
sequential = GridSearchCV(est, grid, cv=2).fit(X, y)
os.remove(log)
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
register_ray()
with joblib.parallel_config(backend="ray"):
    spread = GridSearchCV(est, grid, cv=2, n_jobs=-1).fit(X, y)
ray.shutdown()
same = np.array_equal(spread.cv_results_["mean_test_score"],
                      sequential.cv_results_["mean_test_score"])
print(f"driver {os.getpid()} same-scores {same} best {spread.best_params_ == sequential.best_params_}")
"""


def test_grid_search_on_ray_equals_the_sequential_search(tmp_path):
    """Ray's joblib backend, as a user sets it up (a local Ray instance on loopback, in a network
    namespace of its own where the kernel allows): the candidates (with and without replicas)
    run in Ray's worker processes, score as the sequential search, and leave no stage worker."""
    pytest.importorskip("ray")
    script, log = tmp_path / "ray_search.py", tmp_path / "fits"
    script.write_text(RAY_SEARCH)
    mark = f"skpipe-ray-{os.getpid()}"
    shell = f"{'ip link set lo up' if isolated_network() else 'true'}; " \
            f"SKPIPE_TEST_MARK={mark} RAY_AUTH_MODE=disabled {sys.executable} {script} {log}"
    out = subprocess.run([*isolated_network(), "bash", "-c", shell], capture_output=True,
                         text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = [line for line in out.stdout.splitlines() if line.startswith("driver ")][-1]
    assert "same-scores True best True" in line
    driver = int(line.split()[1])
    fit_pids = [int(p) for p in log.read_text().split()]
    assert len(fit_pids) == 4 * 2 + 1  # 4 candidates x 2 folds, and the refit (in the driver)
    assert fit_pids.count(driver) == 1 and len(set(fit_pids) - {driver}) >= 1  # on Ray workers
    deadline = time.monotonic() + 10
    while marked_workers(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_workers(mark) == []


def marked_workers(mark: str) -> list[int]:
    """Live skpipe stage workers whose environment carries ``mark``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"skpipe.engine.workers._worker_main" not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"SKPIPE_TEST_MARK={mark}".encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found
