"""Quick start: a pipelined classifier like any scikit-learn estimator.

    python examples/quick_start.py
"""

import os

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skpipe import PipeNetClassifier, shutdown_workers

QUICK = bool(os.environ.get("SKPIPE_EXAMPLE_QUICK"))

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)

clf = PipeNetClassifier(
    module__hidden_layer_sizes=(128, 128, 64),
    n_stages=2,            # split the network across two worker processes
    n_microbatches=4,      # each batch flows through the stages in 4 micro-batches
    schedule="1f1b",
    lr=0.003,
    max_epochs=3 if QUICK else 20,
    random_state=0,
)
pipe = make_pipeline(StandardScaler(), clf)

print(clf.plan(StandardScaler().fit_transform(X_train), y_train))  # what each stage will hold
pipe.fit(X_train, y_train)
print(f"test accuracy: {pipe.score(X_test, y_test):.3f}")
print(f"epochs: {len(clf.history_)}, final train loss: {clf.history_[-1, 'train_loss']:.4f}")
shutdown_workers()  # idle workers would also exit by themselves
