"""Choosing a schedule: a grid search over schedule and micro-batch count, and the measured
timelines of the candidates drawn side by side.

    python examples/choose_schedule.py            # writes schedules.png
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.model_selection import GridSearchCV

from skpipe import PipeNetClassifier, shutdown_workers
from skpipe.viz import plot_timeline

QUICK = bool(os.environ.get("SKPIPE_EXAMPLE_QUICK"))
rng = np.random.RandomState(0)
X = rng.normal(size=(2000, 32)).astype(np.float32)
y = (X[:, :4].sum(axis=1) > 0).astype(int)

base = PipeNetClassifier(module__hidden_layer_sizes=(256,) * 6, n_stages=2, batch_size=256,
                         max_epochs=1 if QUICK else 3, random_state=0, timeline_steps=2)
grid = {"schedule": ["gpipe", "1f1b", "interleaved_1f1b", "zbv"], "n_microbatches": [4, 8]}
if QUICK:
    grid = {"schedule": ["gpipe", "zbv"], "n_microbatches": [4]}
search = GridSearchCV(base, grid, cv=2, scoring="accuracy", return_train_score=False)
search.fit(X, y)
results = search.cv_results_
for params, fit_time, score in zip(results["params"], results["mean_fit_time"],
                                   results["mean_test_score"], strict=True):
    print(f"{params}: fit {fit_time:.2f} s, accuracy {score:.3f}")

# one fit per schedule with the timeline recorded, drawn side by side (one column each, on a
# shared time axis, so that a longer step is a wider chart)
schedules = grid["schedule"]
fig, axes = plt.subplots(1, len(schedules), figsize=(6 * len(schedules), 2.6), sharex=True,
                         squeeze=False)
for ax, schedule in zip(axes[0], schedules, strict=True):
    params = {**base.get_params(), "schedule": schedule, "n_microbatches": 4}
    est = PipeNetClassifier(**params).fit(X, y)
    plot_timeline(est.timeline_, ax=ax)
for ax in axes[0][:-1]:
    ax.get_legend().remove()  # the colours are the same in every chart: one legend, at the right
fig.tight_layout()
fig.savefig(os.environ.get("SKPIPE_EXAMPLE_OUT", "schedules.png"), dpi=110)
print("timelines saved")
shutdown_workers()
