"""KFP component `download`: fetch a dataset, validate it and commit it to the object store.

Only the dataset's URI (a string) and its small manifest travel to the next tasks; the images stay in
the store. `python components/download/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Dataset, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa download --source synthetic --dest s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 \
    --n-train 600 --n-test 200 --size 64 --seed 0
"""
PIPELINE_EXAMPLE = r"""
data = download(source="synthetic", store_uri="s3://mlpipeline/hpa-kfp", n_train=600, n_test=200, image_size=64)
data_uri = data.outputs["data_uri"]
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def download(
    source: str,
    store_uri: str,
    manifest: Output[Dataset],
    n_train: int = 600,
    n_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    s3_endpoint: str = "",
    expected_manifest: str = "",
    merge_with: str = "",
) -> NamedTuple("Outputs", [("data_uri", str), ("manifest_sha256", str)]):
    """Fetch a dataset in the Kaggle HPA layout into the store (idempotent) and commit its manifest.

    Args:
        source: synthetic, a directory in Kaggle layout, an s3:// prefix (a committed dataset there is used where it
            is, not copied), an https:// archive, kaggle:human-protein-atlas-image-classification, or hpav18:<csv>
            (with merge_with).
        store_uri: Store prefix; the dataset goes to <store_uri>/datasets/<name from source and counts>.
        manifest: The committed dataset's manifest.json (object keys, sizes, sha256); metadata has its URI.
        n_train: Synthetic: training images to generate; other sources: a seeded random subset of at most this many (0 = all).
        n_test: As n_train, for the test images.
        image_size: Side in pixels of generated synthetic images.
        seed: Seed of the synthetic generator.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
        expected_manifest: sha256 of the dataset's manifest.json in the store when the run started (the dataset_state
            task; a unique "absent-..." token when there was none). Part of the cache key, so a deleted or changed
            dataset is never served from cache; when the dataset is still committed with it, the fetch is skipped.
        merge_with: With source hpav18:<csv> (required there): the Kaggle-layout dataset the v18 images are merged
            into (its test split is the merged dataset's); pHash duplicates across the two stay in one fold.

    Returns:
        data_uri: URI of the committed dataset in the store.
        manifest_sha256: sha256 of its manifest.json as committed.
    """
    import json
    from collections import namedtuple

    from hpa.download import download_task
    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    result = download_task(source, store_uri, n_train, n_test, image_size, seed, expected_manifest,
                           merge_with=merge_with)
    with open(manifest.path, "w") as f:
        json.dump(result["manifest"], f, indent=1)
    manifest.metadata.update(result["metadata"])
    return namedtuple("Outputs", ["data_uri", "manifest_sha256"])(result["data_uri"], result["manifest_sha256"])


if __name__ == "__main__":
    compiler.Compiler().compile(download, str(Path(__file__).with_name("component.yaml")))
