"""KFP component `split`: iterative multilabel stratified k-fold split of the training labels.

Deterministic for a seed, so the task is cached. `python components/split/component.py` rewrites
component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Dataset, Markdown, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa split --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --folds 5 --seed 0 --out split.csv
"""
PIPELINE_EXAMPLE = r"""
folds = split(data_uri=data.outputs["data_uri"], folds=5, seed=0)
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def split(
    data_uri: str,
    split_csv: Output[Dataset],
    fold_plot: Output[Markdown],
    data_manifest: str = "",
    folds: int = 5,
    seed: int = 0,
    s3_endpoint: str = "",
):
    """Assign every training image to a fold (Id,Target,fold), stratified over the 28 labels.

    Args:
        data_uri: URI of a committed dataset (reads its train.csv).
        split_csv: CSV with columns Id,Target,fold.
        fold_plot: Markdown with the per-fold label distribution plot embedded.
        folds: Number of folds, >= 2.
        seed: Seed of the stratified split.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
        data_manifest: sha256 of the dataset's manifest.json (download's manifest_sha256). Only part of the cache key:
            a changed dataset is split again.
    """
    from hpa.split import split_task
    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    numbers, markdown = split_task(data_uri, split_csv.path, folds=folds, seed=seed)
    split_csv.metadata.update(numbers)
    with open(fold_plot.path, "w") as f:
        f.write(markdown)


if __name__ == "__main__":
    compiler.Compiler().compile(split, str(Path(__file__).with_name("component.yaml")))
