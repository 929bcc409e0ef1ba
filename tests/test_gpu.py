"""CUDA paths; skipped where no GPU exists (run on a lent GPU machine with `pytest -m gpu`)."""

import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch

from skpipe import PipeNetClassifier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(90, 6)).astype(np.float32)
    return X, rng.randint(0, 3, 90)


def make(**kw):
    p = dict(module__hidden_layer_sizes=(16, 16, 16), module__activation="tanh", lr=0.01,
             max_epochs=3, batch_size=13, random_state=0)
    p.update(kw)
    return PipeNetClassifier(**p)


def test_single_gpu_fit_matches_cpu():
    X, y = data()
    cpu = make(devices=["cpu"]).fit(X, y)
    gpu = make(devices=["cuda:0"]).fit(X, y)
    assert all(p.device.type == "cpu" for p in gpu.module_.parameters())
    np.testing.assert_allclose(gpu.predict_proba(X), cpu.predict_proba(X), atol=1e-4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev"])
def test_local_pipeline_on_one_gpu_matches_one_device(schedule):
    X, y = data()
    ref = make(devices=["cuda:0"]).fit(X, y)
    est = make(devices=["cuda:0"], n_stages=2, n_microbatches=4, schedule=schedule, launcher="local").fit(X, y)
    for (k, a), b in zip(est.module_.state_dict().items(), ref.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=k)


def test_bf16_autocast_trains():
    X, y = data()
    est = make(devices=["cuda:0"], precision="bf16", max_epochs=20).fit(X, y)
    assert est.score(X, y) > 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_spawn_two_gpus_nccl():
    X, y = data()
    ref = make(devices=["cuda:0"]).fit(X, y)
    est = make(n_stages=2, n_microbatches=4, launcher="spawn", devices=["cuda:0", "cuda:1"]).fit(X, y)
    np.testing.assert_allclose(est.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_gpu_trained_model_loads_without_gpu(tmp_path):
    X, y = data()
    est = make(devices=["cuda:0"]).fit(X, y)
    joblib.dump(est, tmp_path / "m.joblib")
    np.save(tmp_path / "X.npy", X)
    code = (
        "import joblib, numpy as np, torch; assert not torch.cuda.is_available();"
        f"e = joblib.load({str(tmp_path / 'm.joblib')!r}); print(e.predict(np.load({str(tmp_path / 'X.npy')!r})[:5]).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(est.predict(X[:5]).tolist())


def test_out_of_memory_under_a_cap_suggests_stages():
    """A network whose training state (about 2 GiB with Adam) does not fit a 1 GiB cap: the
    error names what it holds and suggests n_stages."""
    X = np.zeros((64, 4096), dtype=np.float32)
    y = np.arange(64) % 3
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2**30 / total, 0)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"the network ran out of memory on "
                           r"cuda(.|\n)*n_stages=2"):
            PipeNetClassifier(module__hidden_layer_sizes=(4096,) * 8, devices=["cuda:0"],
                              max_epochs=1, batch_size=32).fit(X, y)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_network_split_over_gpus_predicts_on_them():
    X, y = data()
    est = make(n_stages=2, n_microbatches=4, launcher="spawn", devices=["cuda:0", "cuda:1"])
    est.fit(X, y)
    assert est.predicts_on_stages()
    with torch.no_grad():
        on_cpu = torch.softmax(est.module_(torch.from_numpy(X)), dim=1).numpy()
    np.testing.assert_allclose(est.predict_proba(X), on_cpu, atol=1e-4)


@pytest.mark.parametrize("setting", [
    "OneCycleLR (SGD momentum)", "Freezer", "GradientNormClipping", "criterion__weight",
    "iterator_train__batch_size below batch_size, BatchNorm", "ragged last batch, BatchNorm",
    "EarlyStopping(load_best=True)", "checkpoint='always'",
])
def test_callback_settings_on_a_gpu_pipeline_match_one_gpu(setting, tmp_path):
    """The callbacks matrix's rows with CUDA stages: two stages on the GPU against one GPU."""
    from tests.test_callbacks import BASE, SETTINGS, X as XC, Y as YC

    def fit(**mode):
        params = {**BASE, **SETTINGS[setting](str(tmp_path)), "devices": ["cuda:0"], **mode}
        return PipeNetClassifier(**{k: v for k, v in params.items() if v is not None}).fit(XC, YC)

    ref = fit(**({} if "BatchNorm" in setting else {"n_microbatches": 1}))
    est = fit(n_stages=2, launcher="local")
    for (k, a), b in zip(est.module_.state_dict().items(), ref.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=k)
