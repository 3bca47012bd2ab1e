"""Run parameters shared by the pipeline (`pipeline.py`), Katib (`hpa.katib`) and the trainer launchers.

One dataclass so that the compiled pipeline, the Katib Experiment and the distributed manifests are
generated from the same defaults instead of hand-kept copies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# Image reference for every component; override at compile time with HPA_IMAGE (see images/README.md).
DEFAULT_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.1.0"
DEFAULT_CUDA_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.1.0-cuda"


def image() -> str:
    return os.environ.get("HPA_IMAGE", DEFAULT_IMAGE)


def cuda_image() -> str:
    return os.environ.get("HPA_CUDA_IMAGE", DEFAULT_CUDA_IMAGE)


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    """Integer environment variable `name` (unset or blank: `default`); a bad value is one ConfigError line."""
    return _env_number(name, default, minimum, int, "an integer")


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    """Finite float environment variable `name` (unset or blank: `default`); a bad value is one ConfigError line."""
    return _env_number(name, default, minimum, float, "a number")


def _env_number(name, default, minimum, kind, expected):
    from hpa.errors import ConfigError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value != value or value in (float("inf"), float("-inf")) or \
            (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"environment variable {name}={raw!r}: expected {expected}{bound}")
    return value


# KFP's object store conventions (the secret every Kubeflow install has).
S3_SECRET_NAME = "mlpipeline-minio-artifact"
S3_SECRET_KEYS = {"accesskey": "HPA_S3_ACCESS_KEY", "secretkey": "HPA_S3_SECRET_KEY"}
# KFP >= 2.15 serves SeaweedFS; 2.16 removed minio-service ("Remove minio", kubeflow/pipelines#12613).
# seaweedfs.kubeflow:9000 is the S3 port kept "for backward compatibility with configs that expect the
# legacy port" (kubeflow/pipelines 2.16.0 manifests/kustomize/third-party/seaweedfs/base/seaweedfs/
# seaweedfs-service.yaml; 8333 is SeaweedFS's own S3 port on the same Service), and the backend's own
# default (2.17.0 backend/src/v2/objectstore/config.go DefaultEndpointInMultiUserMode).
S3_DEFAULT_ENDPOINT = "seaweedfs.kubeflow:9000"
# In multi-user KFP >= 2.15 each profile's mlpipeline-minio-artifact keys may only touch
# mlpipeline/{artifacts,shared}/ and mlpipeline/{private,private-artifacts}/<namespace>/
# (kubeflow/pipelines 2.17.0 manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py,
# put_user_policy). The default store prefix is therefore the run's own namespace's private prefix;
# NAMESPACE_FIELD is replaced by the namespace the task runs in (standalone KFP: kubeflow).
NAMESPACE_FIELD = "{namespace}"
DEFAULT_STORE_URI = "s3://mlpipeline/private/" + NAMESPACE_FIELD + "/hpa-kfp"


def expand_store_uri(uri: str, namespace: str) -> str:
    """`uri` with every {namespace} replaced by `namespace` (a DNS label); other braces are an error."""
    from hpa.errors import ConfigError

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace or ""):
        raise ConfigError(f"namespace {namespace!r}: expected a Kubernetes namespace name (a DNS label)")
    expanded = uri.replace(NAMESPACE_FIELD, namespace)
    if "{" in expanded or "}" in expanded:
        raise ConfigError(f"store_uri {uri!r}: the only placeholder allowed is {NAMESPACE_FIELD}")
    return expanded
DEFAULT_MODELS = {"resnet18": 2e-3, "se_resnet18": 2e-3}

KAGGLE_SECRET_NAME = "kaggle-credentials"
KAGGLE_SECRET_KEYS = {"username": "KAGGLE_USERNAME", "key": "KAGGLE_KEY"}


@dataclass
class PipelineConfig:
    """Defaults of the pipeline's run parameters (the values a user sees in the KFP UI).

    The data, model and training defaults are the embedded local run's (`python pipeline.py run --local`
    on 2 CPU cores), chosen from the measured learning curve in BENCHMARKS.md; a cluster run sets its
    own (image_size=512, epochs, train_folds=5, gpus)."""

    data_source: str = "synthetic"
    store_uri: str = DEFAULT_STORE_URI
    n_train: int = 2000
    n_test: int = 200
    image_size: int = 32
    color_mode: str = "rgby"
    folds: int = 5
    val_fold: int = 0
    epochs: int = 8
    batch_size: int = 32
    # The models to train, create_model name -> peak learning rate; each trains on `train_folds` folds.
    models: dict = field(default_factory=lambda: dict(DEFAULT_MODELS))
    train_folds: int = 1
    loss: str = "bce"
    tta: int = 2
    threshold_mode: str = "prior"
    threshold: float = 0.3
    shrink_strength: float = 10.0
    ensemble_method: str = "mean"
    gpus: int = 0
    accelerator_type: str = "nvidia.com/gpu"
    num_nodes: int = 1
    kaggle_submit: bool = False
    plot_samples: bool = True
    seed: int = 0
    weights: str = ""  # "" = random init | imagenet | a 3-channel state dict file or s3:// URI

    def validate(self) -> "PipelineConfig":
        """Raise ConfigError (one line naming the parameter) for a value out of range; return self.

        Called client side by `pipeline.py run --local|submit` and, in a cluster, by the pipeline's
        first task, so that a bad run parameter fails before any data is downloaded or any GPU used.
        """
        from hpa.errors import ConfigError

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"pipeline parameter {name}={getattr(self, name)!r}: expected {expected}")

        need(bool(self.data_source.strip()), "data_source", "synthetic, a directory, s3://..., https://... or kaggle:<competition>")
        need(bool(self.store_uri.strip()), "store_uri", "a store URI such as s3://bucket/prefix or a local directory")
        need("{" not in self.store_uri.replace(NAMESPACE_FIELD, "") and "}" not in self.store_uri.replace(NAMESPACE_FIELD, ""),
             "store_uri", f"a store URI whose only placeholder is {NAMESPACE_FIELD}")
        need(self.n_train >= 0, "n_train", "an integer >= 0 (0 = all images of a real dataset)")
        need(self.n_test >= 0, "n_test", "an integer >= 0 (0 = all images of a real dataset)")
        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "a positive multiple of 32 (32, 64, ..., 512)")
        need(self.color_mode in ("rgby", "rgb"), "color_mode", "'rgby' or 'rgb'")
        need(self.folds >= 2, "folds", "an integer >= 2")
        need(0 <= self.val_fold < self.folds, "val_fold", f"0 <= val_fold < folds ({self.folds})")
        need(self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.batch_size >= 2, "batch_size", "an integer >= 2 (BatchNorm needs 2 samples)")
        from hpa.models import MODEL_NAMES

        need(isinstance(self.models, dict) and bool(self.models), "models",
             'a non-empty JSON object of model name -> learning rate, e.g. {"resnet18": 0.001}')
        for arch, lr in self.models.items():
            need(arch in MODEL_NAMES, "models", f"model names from {', '.join(MODEL_NAMES)} ({arch!r} is not one)")
            need(isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < 1, "models",
                 f"a learning rate in (0, 1) for each model ({arch}: {lr!r})")
        need(1 <= self.train_folds <= self.folds, "train_folds", f"an integer in [1, folds={self.folds}]")
        need(self.loss in ("bce", "focal"), "loss", "'bce' or 'focal'")
        need(self.tta in (1, 2, 4, 8), "tta", "1, 2, 4 or 8 dihedral transforms")
        need(self.threshold_mode in ("fitted", "global", "shrunk", "prior"), "threshold_mode", "'fitted', 'global', 'shrunk' or 'prior'")
        need(0.0 < self.threshold < 1.0, "threshold", "a decision threshold in (0, 1)")
        need(self.shrink_strength >= 0 and self.shrink_strength == self.shrink_strength, "shrink_strength",
             "a number >= 0 (k of shrunk: a class with k validation positives keeps half its fitted threshold)")
        need(self.ensemble_method in ("mean", "weighted", "rank"), "ensemble_method", "'mean', 'weighted' or 'rank'")
        need(self.gpus >= 0, "gpus", "an integer >= 0")
        need(bool(self.accelerator_type.strip()), "accelerator_type", "a Kubernetes resource name such as nvidia.com/gpu")
        need(self.num_nodes >= 1, "num_nodes", "an integer >= 1")
        need(self.seed >= 0, "seed", "an integer >= 0")
        need(self.weights == self.weights.strip() and not any(c.isspace() for c in self.weights), "weights",
             "empty (random init), imagenet, or a weights file path / s3:// URI without spaces")
        self._check_counts(need)
        return self

    def _check_counts(self, need) -> None:
        """What the images will fail later, computed now: every fold must hold the 2 validation images that
        cross-fitting needs, and a fold's training images must fill one batch per training process (else
        the first train task fails after download, split and pack). Known when the source is synthetic or
        n_train caps a real dataset; a whole real dataset (n_train=0) is checked by split and train."""
        from hpa.download import SYNTHETIC_DEFAULTS

        n = self.n_train or (SYNTHETIC_DEFAULTS[0] if self.data_source == "synthetic" else 0)
        if not n:
            return
        need(n // self.folds >= 2, "n_train" if self.n_train else "folds",
             f"at least 2 images per fold: {n} training images in {self.folds} folds leave {n // self.folds}")
        train = n - -(-n // self.folds)  # the training part of the fold with the most validation images
        processes = max(1, self.gpus) * self.num_nodes
        need(train >= self.batch_size * processes, "batch_size",
             f"at most {train // processes}: n_train={n} in {self.folds} folds leaves {train} training images per "
             f"fold for {processes} training process(es) (lower batch_size or raise n_train)")

    def train_plan(self) -> list[dict]:
        """The training tasks: every model on each of `train_folds` folds, starting at val_fold. One item per
        task of the pipeline's ParallelFor, {"arch", "fold"}; the learning rate comes from `models` (or Katib).
        Models in name order: a JSON object run parameter reaches the task as a protobuf Struct, whose key
        order is not kept."""
        folds = [(self.val_fold + k) % self.folds for k in range(self.train_folds)]
        return [{"arch": arch, "fold": fold} for arch in sorted(self.models) for fold in folds]


@dataclass
class TrainJobArgs:
    """The `python -m hpa train` arguments that the in-cluster launchers (Katib trials, multi-node
    jobs) fix for every pod; defaults follow PipelineConfig so that every rendered manifest agrees."""

    data: str = field(default_factory=lambda: f"{PipelineConfig().store_uri}/data")
    split: str = field(default_factory=lambda: f"{PipelineConfig().store_uri}/split/split.csv")
    fold: int = field(default_factory=lambda: PipelineConfig().val_fold)
    arch: str = "resnet18"
    size: int = field(default_factory=lambda: PipelineConfig().image_size)
    epochs: int = field(default_factory=lambda: PipelineConfig().epochs)
    batch_size: int = field(default_factory=lambda: PipelineConfig().batch_size)
    color_mode: str = field(default_factory=lambda: PipelineConfig().color_mode)
    loss: str = field(default_factory=lambda: PipelineConfig().loss)
    seed: int = field(default_factory=lambda: PipelineConfig().seed)
    weights: str = field(default_factory=lambda: PipelineConfig().weights)

    def fixed_train_args(self) -> list[str]:
        return ["--data", self.data, "--split", self.split, "--fold", str(self.fold), "--arch", self.arch,
                "--size", str(self.size), "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
                "--color-mode", self.color_mode, "--loss", self.loss, "--seed", str(self.seed),
                *(["--weights", self.weights] if self.weights else [])]


def pod_settings(cfg: PipelineConfig, multi_node: bool, namespace: str, cpu_image: str, cuda_image: str) -> dict:
    """The training pods' settings derived from validated run parameters, as the KFP backend needs them.

    - store_uri: {namespace} resolved to the namespace the run's pods live in (a profile in multi-user KFP).
    - gpu_limit: a string. The driver reads runtime resource values with GetStringValue() and skips the
      limit when it is empty (kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go
      resolvePodSpecInputRuntimeParameter, driver.go initPodSpecPatch): an integer-typed parameter there
      would silently request no GPU. "" for gpus=0, so a CPU run carries no accelerator limit at all.
    - train_image: the CUDA image when the pods get GPUs, else the CPU image (both fixed at compile time).
    """
    from hpa.errors import ConfigError

    if cfg.num_nodes > 1 and not multi_node:
        raise ConfigError(f"pipeline parameter num_nodes={cfg.num_nodes}: this is the single-pod pipeline "
                          "(compiled/hpa_pipeline.yaml); multi-node training is compiled/hpa_pipeline_multinode.yaml")
    for name, value in (("cpu_image", cpu_image), ("cuda_image", cuda_image)):
        if not value.strip():
            raise ConfigError(f"check-params {name}={value!r}: expected the image reference fixed at compile time")
    return {
        "store_uri": expand_store_uri(cfg.store_uri, namespace),
        "gpu_limit": str(cfg.gpus) if cfg.gpus > 0 else "",
        "train_image": cuda_image if cfg.gpus > 0 else cpu_image,
    }
