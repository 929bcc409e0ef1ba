"""Ready-made networks. They are ``nn.Sequential`` so that skpipe can split them into stages."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "logistic": nn.Sigmoid,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class MLP(nn.Sequential):
    """A multi-layer perceptron: Linear, activation (and Dropout) per hidden layer, then Linear.

    Parameters
    ----------
    n_features_in : int
        Input width; the estimators pass the number of features of ``X``.
    n_outputs : int
        Output width; the estimators pass the number of classes or target columns.
    hidden_layer_sizes : sequence of int, default=(100,)
        Width of each hidden layer, as in scikit-learn's ``MLPClassifier``.
    activation : {'relu', 'tanh', 'logistic', 'sigmoid', 'gelu', 'identity'}, default='relu'
    dropout : float, default=0.0
        Dropout probability after each hidden activation (no Dropout layer when 0).

    Examples
    --------
    >>> from skpipe.modules import MLP
    >>> net = MLP(4, 3, hidden_layer_sizes=(8, 8))
    >>> [type(layer).__name__ for layer in net]
    ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
    """

    def __init__(
        self,
        n_features_in: int,
        n_outputs: int,
        hidden_layer_sizes: Sequence[int] = (100,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if isinstance(hidden_layer_sizes, int):
            hidden_layer_sizes = (hidden_layer_sizes,)
        sizes = [int(h) for h in hidden_layer_sizes]
        if any(h < 1 for h in sizes):
            raise ValueError(
                f"hidden_layer_sizes must be positive integers; got {tuple(hidden_layer_sizes)}."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}.")
        layers: list[nn.Module] = []
        width = n_features_in
        for h in sizes:
            layers.append(nn.Linear(width, h))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        super().__init__(*layers)
