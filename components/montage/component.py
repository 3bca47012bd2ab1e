"""KFP component `montage`: a grid of sample images with their label names, shown in the KFP UI.

Runs only when the run parameter `plot_samples` is true. `python components/montage/component.py`
rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Markdown, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa montage --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --out montage.png
"""
PIPELINE_EXAMPLE = r"""
with dsl.If(plot_samples == True):
    montage(data_uri=data.outputs["data_uri"])
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def montage(
    data_uri: str,
    montage: Output[Markdown],
    full_image: Output[Artifact],
    n: int = 16,
    seed: int = 0,
    s3_endpoint: str = "",
):
    """Render RGB composites of n training images with their label names (Markdown, image embedded).

    Args:
        data_uri: URI of a committed dataset (the download task's data_uri).
        montage: Markdown with the montage embedded as a data URI, under the KFP UI's 400,000-character limit at
            any image size (a JPEG thumbnail when the PNG is too large).
        full_image: The full-size montage PNG.
        n: Number of images in the grid.
        seed: Seed that picks the images.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
    """
    from hpa.montage import montage_task
    from hpa.store import use_endpoint

    use_endpoint(s3_endpoint)
    text = montage_task(data_uri, full_image.path, full_image.uri, n=n, seed=seed)
    with open(montage.path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    compiler.Compiler().compile(montage, str(Path(__file__).with_name("component.yaml")))
