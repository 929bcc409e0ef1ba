"""Mixed-type data with missing values: ColumnTransformer -> PipeNetClassifier, cross-validated.

    python examples/mixed_types_pipeline.py
"""

import os

from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.impute import SimpleImputer
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from skpipe import PipeNetClassifier, shutdown_workers
from skpipe.datasets import load_penguins

QUICK = bool(os.environ.get("SKPIPE_EXAMPLE_QUICK"))

X, y = load_penguins(return_X_y=True)  # numbers, text categories, missing values
print(X.head())

preprocess = ColumnTransformer([
    ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
     make_column_selector(dtype_include="number")),
    ("categories", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                 OneHotEncoder(handle_unknown="ignore")),
     make_column_selector(dtype_exclude="number")),
])
pipe = make_pipeline(preprocess, PipeNetClassifier(
    module__hidden_layer_sizes=(32, 32), n_stages=2, n_microbatches=2, lr=0.01,
    max_epochs=5 if QUICK else 30, batch_size=32, random_state=0,
))
# every fold fits the preprocessing on its own training part: no leakage
scores = cross_val_score(pipe, X, y, cv=3 if QUICK else 5)
print(f"cross-validated accuracy: {scores.mean():.3f} +/- {scores.std():.3f}")
shutdown_workers()
