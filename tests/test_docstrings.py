"""Both estimators' docstrings pass numpydoc's validation, and document every fitted attribute."""

import re

import numpy as np
import pytest
from numpydoc.validate import validate

from skpipe import PipeNetClassifier, PipeNetRegressor

# What scikit-learn's own docstring test does not ask of methods either: an extended summary,
# a See Also and an Examples section per method, and 'self : object' as fit's return line.
METHOD_EXEMPT = {"ES01", "SA01", "EX01", "RT02"}

METHODS = {
    PipeNetClassifier: ["fit", "partial_fit", "plan", "forward_pipelined", "predict", "predict_proba",
                        "predict_log_proba"],
    PipeNetRegressor: ["fit", "partial_fit", "plan", "forward_pipelined", "predict"],
}


@pytest.mark.parametrize("cls", [PipeNetClassifier, PipeNetRegressor], ids=lambda c: c.__name__)
def test_class_docstring_is_valid_numpydoc(cls):
    assert validate(f"skpipe.{cls.__name__}")["errors"] == []


@pytest.mark.parametrize("name", [f"skpipe.{c.__name__}.{m}" for c, ms in METHODS.items() for m in ms])
def test_method_docstrings_are_valid_numpydoc(name):
    errors = [e for e in validate(name)["errors"] if e[0] not in METHOD_EXEMPT]
    assert errors == []


@pytest.mark.parametrize("cls", [PipeNetClassifier, PipeNetRegressor], ids=lambda c: c.__name__)
def test_every_parameter_and_fitted_attribute_is_documented(cls, classification_data):
    doc = cls.__doc__
    params = doc[doc.index("Parameters\n"):doc.index("Attributes\n")]
    attributes = doc[doc.index("Attributes\n"):doc.index("See Also\n")]
    for name in cls._get_param_names():
        assert re.search(rf"^\s+{name} :", params, re.M), name
    X, y = classification_data
    est = cls(max_epochs=1, n_stages=2, launcher="local", n_microbatches=2,
              timeline_steps=1).fit(X, y.astype(np.float64) if cls is PipeNetRegressor else y)
    fitted = set(vars(est)) - set(cls._get_param_names())
    # fitted state is named as scikit-learn names it: with a trailing underscore
    assert {a for a in fitted if not a.endswith("_")} == set()
    for name in fitted:
        assert re.search(rf"^\s+{name} :", attributes, re.M), name
    for name in ("plan_", "timeline_", "config_"):
        assert name in fitted


def test_classifier_signature_is_the_base_signature_plus_class_weight():
    """The classifier spells its constructor out (scikit-learn's convention, as MLPClassifier and
    MLPRegressor do); a parameter added to one side only fails here."""
    import inspect

    from skpipe.estimators._base import BasePipeNet

    base = inspect.signature(BasePipeNet.__init__).parameters
    classifier = inspect.signature(PipeNetClassifier.__init__).parameters
    assert [p for p in classifier if p != "class_weight"] == list(base)
    for name, param in base.items():
        assert classifier[name].default == param.default, name
        assert classifier[name].kind == param.kind, name
