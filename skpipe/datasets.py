"""Data bundled with skpipe, so that examples and tests never need the network."""

from __future__ import annotations

from importlib import resources

import pandas as pd


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
