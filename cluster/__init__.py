"""What a real Kubeflow cluster requires, checked and used from here.

`cluster.backend_rules` carries the KFP backend's rules, read from the upstream code of kubeflow/pipelines
2.15.0, 2.16.0 and 2.17.0 (each rule cites its file and tag); its API is re-exported here:

    from cluster import check_pipeline_spec, min_backend_version, strict_local

    check_pipeline_spec("compiled/hpa_pipeline.yaml", backend="2.16.0")  # -> [Violation, ...]
    min_backend_version("compiled/hpa_pipeline.yaml")                    # -> "2.15.0"
    with strict_local() as run:                                          # kfp.local, resolved like the driver
        my_pipeline(...)
    run.pod("check-params").limits                                       # what the driver would request

Importing the package is cheap (backend_rules imports kfp only when a check or strict_local needs it).
Unlike `hpa/`, modules here may import kfp.
"""

from cluster.backend_rules import (
    KNOWN_BACKENDS,
    RULES,
    BackendResolutionError,
    PodSpecValues,
    Rule,
    StrictRun,
    Violation,
    check_pipeline_spec,
    format_violations,
    load_pipeline_spec,
    min_backend_version,
    strict_local,
)

__all__ = [
    "KNOWN_BACKENDS",
    "RULES",
    "BackendResolutionError",
    "PodSpecValues",
    "Rule",
    "StrictRun",
    "Violation",
    "check_pipeline_spec",
    "format_violations",
    "load_pipeline_spec",
    "min_backend_version",
    "strict_local",
]
