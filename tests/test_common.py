"""scikit-learn's own estimator checks, on both estimators."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skpipe import PipeNetClassifier, PipeNetRegressor

# Small settings keep the ~100 checks fast; the defaults are exercised elsewhere.
ESTIMATORS = [
    PipeNetClassifier(max_epochs=20, lr=0.01),
    PipeNetRegressor(max_epochs=20, lr=0.01),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
