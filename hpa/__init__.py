"""hpa: train, tune, ensemble and submit multi-label classifiers for the Human Protein Atlas task.

The library knows nothing of Kubeflow: every stage is a plain function with a CLI
(`python -m hpa <stage> ...`); `components/` wraps the same functions for KFP.
"""

__version__ = "0.2.0"
