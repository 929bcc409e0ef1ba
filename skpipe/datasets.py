"""Data bundled with skpipe, so that examples and tests never need the network."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from sklearn.compose import ColumnTransformer


def load_penguins(*, return_X_y: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.Series]:
    """The Palmer penguins data: 344 penguins, mixed numeric and categorical columns, with
    missing values. The target is ``species`` (Adelie, Chinstrap, Gentoo).

    Parameters
    ----------
    return_X_y : bool, default=False
        Return ``(X, y)`` with ``X`` the seven feature columns and ``y`` the species.

    Examples
    --------
    >>> from skpipe.datasets import load_penguins
    >>> X, y = load_penguins(return_X_y=True)
    >>> X.shape, sorted(y.unique())
    ((344, 7), ['Adelie', 'Chinstrap', 'Gentoo'])
    """
    with resources.files("skpipe").joinpath("data/penguins.csv").open("r") as f:
        frame = pd.read_csv(f)
    if not return_X_y:
        return frame
    return frame.drop(columns="species"), frame["species"]


def penguin_preprocessor() -> ColumnTransformer:
    """The preprocessing the penguins data needs: numbers imputed (median) and scaled, text
    columns imputed (most frequent) and one-hot encoded (unknown categories ignored).

    Returns
    -------
    ColumnTransformer
        Unfitted; put it before the estimator in a ``Pipeline``.

    Examples
    --------
    >>> from skpipe.datasets import load_penguins, penguin_preprocessor
    >>> X, y = load_penguins(return_X_y=True)
    >>> penguin_preprocessor().fit_transform(X).shape
    (344, 10)
    """
    from sklearn.compose import ColumnTransformer, make_column_selector
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    categorical = make_pipeline(
        SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")
    )
    return ColumnTransformer(
        [
            ("numeric", numeric, make_column_selector(dtype_include="number")),
            ("categorical", categorical, make_column_selector(dtype_exclude="number")),
        ]
    )
