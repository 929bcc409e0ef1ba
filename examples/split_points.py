"""A network written as forward code, split where it calls torch's pipe_split().

    python examples/split_points.py

The network is a small [CLS]-token transformer over the columns of a table: its forward reads the
batch size, keeps a skip connection across every block, and marks with ``pipe_split()`` where
it may be cut. skpipe traces it with torch.fx at those marks; the pieces between them are the
layers the plan balances over the stages (the skip connection rides through the pieces it
skips). A grid search then tries two and three stages and two schedules, inside a scikit-learn
pipeline, on spawned workers.
"""

import os

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.distributed.pipelining import pipe_split

from skpipe import PipeNetClassifier, shutdown_workers

QUICK = bool(os.environ.get("SKPIPE_EXAMPLE_QUICK"))


class ColumnTransformerNet(nn.Module):
    """Each column becomes a token (its value times a learnt vector, plus a bias); a [CLS]
    token joins them; ``n_blocks`` transformer blocks, a mark after each; the head reads [CLS]."""

    def __init__(self, n_features_in, n_outputs, d_token=32, n_blocks=3, n_heads=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_features_in, d_token) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_features_in, d_token))
        self.cls = nn.Parameter(torch.randn(1, 1, d_token) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_token, n_heads, 2 * d_token, dropout=0.1,
                                       batch_first=True, norm_first=True)
            for _ in range(n_blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(d_token), nn.ReLU(), nn.Linear(d_token, n_outputs))

    def forward(self, x):
        tokens = x.unsqueeze(-1) * self.weight + self.bias          # (rows, columns, d_token)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        first = h
        for block in self.blocks:
            h = block(h)
            pipe_split()                                           # a stage may end here
        return self.head((h + first)[:, 0])


X, y = load_breast_cancer(return_X_y=True)
X = X.astype("float32")
X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)

clf = PipeNetClassifier(module=ColumnTransformerNet, n_stages=2, n_microbatches=4,
                        max_epochs=2 if QUICK else 15, lr=1e-3, batch_size=64, random_state=0)
print(clf.plan(StandardScaler().fit_transform(X_train), y_train))  # the pieces, per stage

pipe = make_pipeline(StandardScaler(), clf)
grid = {"pipenetclassifier__n_stages": [2, 3] if not QUICK else [2],
        "pipenetclassifier__schedule": ["1f1b", "gpipe"]}
search = GridSearchCV(pipe, grid, cv=3).fit(X_train, y_train)
print("best:", search.best_params_, f"cross-validated accuracy {search.best_score_:.3f}")
print(f"test accuracy: {search.score(X_test, y_test):.3f}")
shutdown_workers()
