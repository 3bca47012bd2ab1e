"""Run parameters shared by the pipeline (`pipeline.py`), Katib (`hpa.katib`) and the trainer launchers.

One dataclass so that the compiled pipeline, the Katib Experiment and the distributed manifests are
generated from the same defaults instead of hand-kept copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Image reference for every component; override at compile time with HPA_IMAGE (see images/README.md).
DEFAULT_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.1.0"
DEFAULT_CUDA_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.1.0-cuda"


def image() -> str:
    return os.environ.get("HPA_IMAGE", DEFAULT_IMAGE)


def cuda_image() -> str:
    return os.environ.get("HPA_CUDA_IMAGE", DEFAULT_CUDA_IMAGE)


# KFP's object store conventions (the secret every Kubeflow install has).
S3_SECRET_NAME = "mlpipeline-minio-artifact"
S3_SECRET_KEYS = {"accesskey": "HPA_S3_ACCESS_KEY", "secretkey": "HPA_S3_SECRET_KEY"}
S3_DEFAULT_ENDPOINT = "minio-service.kubeflow:9000"
KAGGLE_SECRET_NAME = "kaggle-credentials"
KAGGLE_SECRET_KEYS = {"username": "KAGGLE_USERNAME", "key": "KAGGLE_KEY"}


@dataclass
class PipelineConfig:
    """Defaults of the pipeline's run parameters (the values a user sees in the KFP UI)."""

    data_source: str = "synthetic"
    store_uri: str = "s3://mlpipeline/hpa-kfp"
    n_train: int = 600
    n_test: int = 200
    image_size: int = 64
    color_mode: str = "rgby"
    folds: int = 5
    val_fold: int = 0
    epochs: int = 2
    batch_size: int = 32
    lr_resnet18: float = 1e-3
    lr_se_resnet: float = 1e-3
    loss: str = "bce"
    tta: int = 2
    threshold_mode: str = "fitted"
    threshold: float = 0.3
    ensemble_method: str = "mean"
    gpus: int = 0
    accelerator_type: str = "nvidia.com/gpu"
    num_nodes: int = 1
    kaggle_submit: bool = False
    plot_samples: bool = True
    seed: int = 0
