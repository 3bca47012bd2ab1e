"""Fault classes of the cases in tests/faults, counted by tests/conftest.py (which prints them at the end of a
run, also under pytest-xdist: the class travels with each report as a user property).

A case is one test item (each parametrized case counts once) that ran; the `test_count_of_cases`-style summary
tests are not cases. A module's class comes from FAULT_CLASS; a test can override it with
`@pytest.mark.fault_class("process")` (e.g. the kill tests of an otherwise bad-input module).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

FAULT_CLASS = {  # module -> class; the classes in the order they are printed (tests/conftest.py FAULT_CLASSES)
    "test_bad_input_data": "data",
    "test_eval_faults": "data",
    "test_pipeline_params": "data",
    "test_archive_faults": "archives",
    "test_shard_faults": "store",
    "test_store_faults": "store",
    "test_verified_reads": "store",
    "test_download_faults": "process",
    "test_train_faults": "process",
    "test_signal_faults": "process",
    "test_manifest_secrets": "secrets",
    "test_secrets_scan": "secrets",
    "test_secret_names": "secrets",
    "test_resume_faults": "resume",
}
CLASSES = tuple(dict.fromkeys(FAULT_CLASS.values()))
_HERE = Path(__file__).parent
_classes: dict[str, str] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "fault_class(name): the fault class of a test in tests/faults "
                                       f"({', '.join(CLASSES)})")


def fault_class(item) -> str | None:
    path = Path(str(item.fspath))
    if path.parent != _HERE or "count" in item.name:
        return None
    marker = item.get_closest_marker("fault_class")
    name = marker.args[0] if marker else FAULT_CLASS.get(path.stem)
    if name not in CLASSES:
        raise pytest.UsageError(f"{path.name}::{item.name}: no fault class (add it to FAULT_CLASS in {__file__})")
    return name


def pytest_collection_modifyitems(items):
    for item in items:
        name = fault_class(item)
        if name:
            _classes[item.nodeid] = name
            item.user_properties.append(("fault_class", name))  # travels with the report (pytest-xdist workers)


def pytest_collection_finish(session):
    if session.config.option.collectonly and _classes:
        counts = Counter(_classes.values())
        print(f"fault cases collected: {len(_classes)} ({', '.join(f'{c} {counts[c]}' for c in CLASSES)})")
