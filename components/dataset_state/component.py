"""KFP component `dataset_state`: where this run's dataset is and what the store holds for it now.

Never cached: its outputs are what makes the cache keys of download, split and pack follow the store (a
deleted or changed dataset is a cache miss). `python components/dataset_state/component.py` rewrites
component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

import hpa.config


CLI_EXAMPLE = r"""
python -c "from hpa.committed import dataset_state; print(dataset_state('synthetic', 's3://mlpipeline/hpa-kfp', 600, 200, 64, 0))"
"""
PIPELINE_EXAMPLE = r"""
state = dataset_state(source=data_source, store_uri=store, n_train=n_train, n_test=n_test, image_size=image_size, seed=seed)
state.set_caching_options(False)
data = download(..., expected_manifest=state.outputs["manifest_sha256"])
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def dataset_state(
    source: str,
    store_uri: str,
    n_train: int = 600,
    n_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    s3_endpoint: str = "",
    merge_with: str = "",
) -> NamedTuple("Outputs", [("existing", bool), ("data_uri", str), ("manifest_sha256", str), ("shards_sha256", str)]):
    """Find the run's dataset in the store and hash its manifests as they are now.

    Args:
        source: The data_source run parameter (synthetic, a directory, s3://..., https://..., kaggle:...).
        store_uri: Store prefix; a dataset that download would make goes to <store_uri>/datasets/<name>.
        n_train: As download's n_train (part of the dataset's name).
        n_test: As download's n_test.
        image_size: As download's image_size (and the shards' size).
        seed: As download's seed.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
        merge_with: As download's merge_with (part of the dataset's name).

    Returns:
        existing: True when source is itself a committed s3:// dataset (used where it is, not copied).
        data_uri: That dataset, or the prefix download commits to.
        manifest_sha256: sha256 of the dataset's manifest.json now ("" when absent).
        shards_sha256: sha256 over its shards' shards.json files at image_size now ("" when absent).
    """
    from collections import namedtuple

    from hpa.committed import dataset_state as state_of
    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    state = state_of(source, store_uri, n_train, n_test, image_size, seed, merge_with=merge_with)
    return namedtuple("Outputs", ["existing", "data_uri", "manifest_sha256", "shards_sha256"])(
        state["existing"], state["data_uri"], state["manifest_sha256"], state["shards_sha256"])


if __name__ == "__main__":
    compiler.Compiler().compile(dataset_state, str(Path(__file__).with_name("component.yaml")))
