"""The pipeline-parallel engine behind the estimators' ``fit`` (no scikit-learn in here)."""
