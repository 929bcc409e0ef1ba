"""Ready-made networks. They are ``nn.Sequential`` so that skpipe can split them into stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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
        _check_dropout("dropout", dropout)
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _check_dropout(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value!r}.")


class ResidualBlock(nn.Module):
    """``x + Dropout(Linear(Dropout(ReLU(Linear(LayerNorm(x))))))``: one block of the tabular
    ResNet (Gorishniy et al., 2021); takes and returns one tensor, so stages can cut between
    blocks."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(torch.relu(self.up(self.norm(x))))
        return x + self.dropout(self.down(h))


class TabularResNet(nn.Sequential):
    """The ResNet for tabular data of Gorishniy et al. (2021), as a Sequential of blocks that
    skpipe splits into stages: Linear(n_features_in, width), ``n_blocks`` residual blocks,
    then LayerNorm, ReLU and Linear(width, n_outputs).

    Parameters
    ----------
    n_features_in, n_outputs : int
        Passed by the estimators.
    width : int, default=128
    n_blocks : int, default=4
    hidden_factor : float, default=2.0
        Each block's hidden width is ``width * hidden_factor``.
    dropout : float, default=0.0

    About ``2 * hidden_factor * width**2 * n_blocks`` parameters: ``width=1024, n_blocks=256``
    is about 1.1B.

    Examples
    --------
    >>> from skpipe.modules import TabularResNet
    >>> net = TabularResNet(10, 3, width=16, n_blocks=2)
    >>> [type(layer).__name__ for layer in net]
    ['Linear', 'ResidualBlock', 'ResidualBlock', 'LayerNorm', 'ReLU', 'Linear']
    """

    def __init__(
        self,
        n_features_in: int,
        n_outputs: int,
        width: int = 128,
        n_blocks: int = 4,
        hidden_factor: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        _check_positive(width=width, n_blocks=n_blocks)
        _check_dropout("dropout", dropout)
        if hidden_factor <= 0:
            raise ValueError(f"hidden_factor must be positive; got {hidden_factor!r}.")
        hidden = max(1, int(width * hidden_factor))
        super().__init__(
            nn.Linear(n_features_in, width),
            *[ResidualBlock(width, hidden, dropout) for _ in range(n_blocks)],
            nn.LayerNorm(width),
            nn.ReLU(),
            nn.Linear(width, n_outputs),
        )


class FeatureTokenizer(nn.Module):
    """Each column j becomes the token ``x_j * w_j + b_j`` (d numbers), and a learned [CLS]
    token is appended: (rows, n_features) -> (rows, n_features + 1, d). A one-hot column (0/1,
    as a ColumnTransformer's OneHotEncoder makes it) gets ``b_j`` or ``w_j + b_j``: an embedding
    of its category."""

    def __init__(self, n_features: int, d_token: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_features, d_token))
        self.bias = nn.Parameter(torch.empty(n_features, d_token))
        self.cls = nn.Parameter(torch.empty(1, 1, d_token))
        bound = d_token**-0.5
        for p in (self.weight, self.bias, self.cls):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.unsqueeze(-1) * self.weight + self.bias
        return torch.cat([tokens, self.cls.expand(x.shape[0], 1, -1)], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (rows, tokens, d) with the heads' projections as four
    ``nn.Linear`` layers (``q``, ``k``, ``v``, ``out``), so that tensor parallelism can split
    the heads over ranks: ``q``/``k``/``v`` split by output (each rank computes its heads),
    ``out`` by input (the heads' results summed). The number of heads a rank computes is read
    from the width it is given, so the same module runs whole or split.

    Initialised as torch's ``nn.MultiheadAttention``: the three projections together Xavier-
    uniform (as one 3d x d matrix), their biases and ``out``'s bias zero.
    """

    def __init__(self, d_token: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_token // n_heads
        self.dropout = dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d_token, d_token) for _ in range(4))
        bound = (6.0 / (4 * d_token)) ** 0.5  # xavier_uniform_ of the packed (3d, d) matrix
        for layer in (self.q, self.k, self.v):
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        rows, tokens, _ = x.shape
        q, k, v = (self._heads(p(x)) for p in (self.q, self.k, self.v))
        p = self.dropout if self.training else 0.0
        h = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(h.transpose(1, 2).reshape(rows, tokens, -1))

    def _heads(self, t: Tensor) -> Tensor:
        """(rows, tokens, heads x head_dim) -> (rows, heads, tokens, head_dim)."""
        rows, tokens, width = t.shape
        return t.view(rows, tokens, width // self.head_dim, self.head_dim).transpose(1, 2)


class TransformerBlock(nn.Module):
    """A pre-norm Transformer block on (rows, tokens, d): attention, then a feed-forward
    network, each with a residual connection; one tensor in, one out."""

    def __init__(self, d_token: int, n_heads: int, ffn_factor: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_token)
        self.attention = SelfAttention(d_token, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_token)
        hidden = max(1, int(d_token * ffn_factor))
        self.ffn = nn.Sequential(nn.Linear(d_token, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_token))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class CLSHead(nn.Module):
    """LayerNorm, ReLU and Linear on the [CLS] token (the last one): (rows, tokens, d) ->
    (rows, n_outputs)."""

    def __init__(self, d_token: int, n_outputs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_token)
        self.linear = nn.Linear(d_token, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.relu(self.norm(x[:, -1])))


class FTTransformer(nn.Sequential):
    """The FT-Transformer of Gorishniy et al. (2021), as a Sequential skpipe splits into stages:
    a feature tokenizer (numeric and one-hot columns alike), ``n_blocks`` Transformer blocks,
    and a head on the [CLS] token. Stage boundaries carry (rows, n_features + 1, d_token).

    Parameters
    ----------
    n_features_in, n_outputs : int
        Passed by the estimators.
    d_token : int, default=64
        Width of each token; a multiple of ``n_heads``.
    n_blocks : int, default=3
    n_heads : int, default=8
    ffn_factor : float, default=4/3
        Feed-forward hidden width = ``d_token * ffn_factor``.
    dropout : float, default=0.0

    About ``(4 + 2 * ffn_factor) * d_token**2 * n_blocks`` parameters: ``d_token=1024,
    n_blocks=160`` is about 1.0B.

    Examples
    --------
    >>> import torch
    >>> from skpipe.modules import FTTransformer
    >>> net = FTTransformer(5, 2, d_token=16, n_blocks=2, n_heads=4)
    >>> [type(layer).__name__ for layer in net]
    ['FeatureTokenizer', 'TransformerBlock', 'TransformerBlock', 'CLSHead']
    >>> net(torch.zeros(3, 5)).shape
    torch.Size([3, 2])
    """

    def __init__(
        self,
        n_features_in: int,
        n_outputs: int,
        d_token: int = 64,
        n_blocks: int = 3,
        n_heads: int = 8,
        ffn_factor: float = 4 / 3,
        dropout: float = 0.0,
    ) -> None:
        _check_positive(d_token=d_token, n_blocks=n_blocks, n_heads=n_heads)
        _check_dropout("dropout", dropout)
        if d_token % n_heads:
            raise ValueError(
                f"d_token ({d_token}) must be a multiple of n_heads ({n_heads}); each head "
                "takes d_token / n_heads of every token."
            )
        if ffn_factor <= 0:
            raise ValueError(f"ffn_factor must be positive; got {ffn_factor!r}.")
        super().__init__(
            FeatureTokenizer(n_features_in, d_token),
            *[TransformerBlock(d_token, n_heads, ffn_factor, dropout) for _ in range(n_blocks)],
            CLSHead(d_token, n_outputs),
        )
