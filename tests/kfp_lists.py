"""Lists of local files as KFP artifact lists, the way the pipeline hands them to ensemble and compare-plots.

`stage_pairs(pairs)` inside a test pipeline runs a dsl.ParallelFor over {"val": path, "test": path} items
and returns the two dsl.Collected lists of Dataset artifacts, in item order (as the training loop's
outputs reach the ensemble). A real kfp.local ParallelFor + Collected, no stand-in.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def stage_pair(val: str, test: str, val_file: Output[Dataset], test_file: Output[Dataset]):
    """Copy two local files into artifacts."""
    import shutil

    shutil.copyfile(val, val_file.path)
    shutil.copyfile(test, test_file.path)


def stage_pairs(pairs: list[dict]):
    with dsl.ParallelFor(pairs, name="staged-files") as item:
        staged = stage_pair(val=item.val, test=item.test)
    return dsl.Collected(staged.outputs["val_file"]), dsl.Collected(staged.outputs["test_file"])
