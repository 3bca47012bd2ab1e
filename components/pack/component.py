"""KFP component `pack`: the dataset packed once at the training size into streamable shards.

WebDataset-style tar shards of zstd-compressed uint8 R,G,B,Y arrays (`hpa.shards`), written to
`<data_uri>/shards-<size>px/{train,test}/` in the store with a `shards.json` manifest each. Training
streams them through a bounded cache instead of copying every PNG into the pod, and decodes them several
times faster than PNG. Idempotent (a re-run skips shards that are already there). Cached.
`python components/pack/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Dataset, Output

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa pack --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --size 64 --split train \
    --out s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0/shards-64px
python -m hpa pack --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --size 64 --split test \
    --out s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0/shards-64px
"""
PIPELINE_EXAMPLE = r"""
shards = pack(data_uri=data.outputs["data_uri"], image_size=64)
trained = train(data_uri=data.outputs["data_uri"], shards_uri=shards.outputs["shards_uri"], arch="resnet18", fold=0, ...)
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def pack(
    data_uri: str,
    manifests: Output[Dataset],
    image_size: int = 64,
    s3_endpoint: str = "",
    data_manifest: str = "",
    expected_shards: str = "",
) -> NamedTuple("Outputs", [("shards_uri", str)]):
    """Pack the train and test images of a committed dataset into tar shards at image_size.

    Args:
        data_uri: URI of a committed dataset (the download task's data_uri).
        manifests: The two shards.json manifests (train, test) as one JSON file; metadata has the counts.
        image_size: Side in pixels the images are packed at (the training size).
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
        data_manifest: sha256 of the dataset's manifest.json (download's manifest_sha256). Only part of the cache key.
        expected_shards: sha256 over the shards' shards.json files when the run started (the dataset_state task; a
            unique "absent-..." token when there were none). Only part of the cache key: deleted or changed shards
            are never served from cache.

    Returns:
        shards_uri: Root of the shards (<data_uri>/shards-<size>px), with train/ and test/ below it.
    """
    import json
    import os
    from collections import namedtuple

    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    from hpa.committed import shards_prefix
    from hpa.pack import pack as pack_shards

    shards_uri = shards_prefix(data_uri, image_size)
    workers = min(8, len(os.sched_getaffinity(0)))
    summaries = {split: pack_shards(data_uri, shards_uri, image_size, split=split, workers=workers)
                 for split in ("train", "test")}
    with open(manifests.path, "w") as f:
        json.dump(summaries, f, indent=1)
    manifests.metadata.update({"uri": shards_uri, **{f"{s}_{k}": v for s, summary in summaries.items()
                                                     for k, v in summary.items() if k in ("num_samples", "num_shards", "bytes")}})
    return namedtuple("Outputs", ["shards_uri"])(shards_uri)


if __name__ == "__main__":
    compiler.Compiler().compile(pack, str(Path(__file__).with_name("component.yaml")))
