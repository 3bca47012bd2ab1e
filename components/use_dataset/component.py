"""KFP component `use_dataset`: an existing committed dataset, checked and handed on as a URI.

The pipeline imports a committed s3:// dataset with dsl.importer (so that the lineage graph shows it) instead
of copying it; this task reads its manifest, checks it is the one seen when the run started, and outputs the
URI the next tasks read. `python components/use_dataset/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input

import hpa.config


CLI_EXAMPLE = r"""
python -c "from hpa.committed import use_dataset; print(use_dataset('s3://mlpipeline/shared/hpa/kaggle-512'))"
"""
PIPELINE_EXAMPLE = r"""
imported = dsl.importer(artifact_uri=data_source, artifact_class=Dataset, reimport=False)
used = use_dataset(dataset=imported.output, expected_manifest=state.outputs["manifest_sha256"])
data_uri = used.outputs["data_uri"]
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def use_dataset(
    dataset: Input[Dataset],
    expected_manifest: str = "",
    s3_endpoint: str = "",
) -> NamedTuple("Outputs", [("data_uri", str), ("manifest_sha256", str)]):
    """Check an imported committed dataset (its manifest.json) and output its URI for the next tasks.

    Args:
        dataset: The imported dataset (its URI is the dataset's s3:// prefix).
        expected_manifest: sha256 of its manifest when the run started (dataset_state); a changed manifest fails.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.

    Returns:
        data_uri: The dataset's URI.
        manifest_sha256: sha256 of its manifest.json.
    """
    from collections import namedtuple

    from hpa.committed import use_dataset as check_dataset
    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    info = check_dataset(dataset.uri, expected_manifest)
    return namedtuple("Outputs", ["data_uri", "manifest_sha256"])(info["data_uri"], info["manifest_sha256"])


if __name__ == "__main__":
    compiler.Compiler().compile(use_dataset, str(Path(__file__).with_name("component.yaml")))
