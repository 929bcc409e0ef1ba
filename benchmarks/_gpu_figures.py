import numpy as np
from skpipe import PipeNetClassifier

rng = np.random.RandomState(0)
X = rng.normal(size=(16384, 1024)).astype(np.float32)
y = (X[:, 0] > 0).astype(np.int64)
for kw in [
    dict(),
    dict(n_stages=2, launcher="local", n_microbatches=4),
    dict(n_stages=4, launcher="local", n_microbatches=8, schedule="interleaved_1f1b"),
    dict(precision="bf16"),
]:
    e = PipeNetClassifier(
        module__hidden_layer_sizes=(4096,) * 8,
        max_epochs=3,
        batch_size=1024,
        devices=["cuda:0"],
        random_state=0,
        **kw,
    ).fit(X, y)
    print(
        kw,
        "epoch s",
        [round(h["dur"], 3) for h in e.history_],
        "loss",
        round(e.history_[-1, "train_loss"], 4),
    )
