"""Run parameters shared by the pipeline (`pipeline.py`), Katib (`hpa.katib`) and the trainer launchers.

One dataclass so that the compiled pipeline, the Katib Experiment and the distributed manifests are
generated from the same defaults instead of hand-kept copies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from hpa.options import help_of, opt, require, spoken

# Image reference for every component; override at compile time with HPA_IMAGE (see images/README.md).
DEFAULT_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.2.0"
DEFAULT_CUDA_IMAGE = "ghcr.io/hpa-kfp/hpa-kfp:0.2.0-cuda"


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

    data_source: str = opt("synthetic", "Where the images come from: synthetic (HPA-like generated data), a "
        "directory in Kaggle layout, an s3:// prefix (a committed dataset is imported and read where it is), an "
        "https:// zip/tar archive, kaggle:human-protein-atlas-image-classification, or hpav18:<csv> (the HPA v18 "
        "external images; hpav18:pudae = pudae's de-duplicated v18 table, pinned by sha256).")
    merge_with: str = opt("", "With data_source=hpav18:<csv> (and only there, where it is required: the v18 images "
        "have no test split): the Kaggle-layout dataset the v18 images are merged into, e.g. a committed "
        "s3://.../datasets/<name>, a directory or kaggle:human-protein-atlas-image-classification; pHash duplicates "
        "across the two stay in one fold.")
    store_uri: str = opt(DEFAULT_STORE_URI, "Object store prefix that holds the datasets (s3://bucket/prefix, or a "
        "directory for local runs); {namespace} is replaced by the run's namespace (multi-user profiles may only "
        "write under mlpipeline/private/<namespace>/ and mlpipeline/shared/).")
    n_train: int = opt(2000, "Training images: how many to generate for synthetic data; for other sources a seeded "
        "random subset of at most this many (0 = all).")
    n_test: int = opt(200, "Test images, as n_train (the Kaggle test set has 11,702; 0 = all).")
    image_size: int = opt(32, "Image side in pixels for training and inference; a positive multiple of 32 (512 = "
        "full resolution).")
    color_mode: str = opt("rgby", choices=("rgby", "rgb"), help="rgby (4 channels, red/green/blue/yellow) or rgb "
        "(3 channels: G, (R+Y)/2, (B+Y)/2).")
    folds: int = opt(5, "Number of iterative-stratified folds (>= 2).")
    val_fold: int = opt(0, "The first fold held out for validation (0 <= val_fold < folds); with train_folds = k, "
        "folds val_fold .. val_fold + k - 1 (mod folds) are each held out once.")
    epochs: int = opt(8, "Training epochs per model (>= 1).")
    batch_size: int = opt(32, "Batch size per training task (>= 2).")
    models: dict = opt(default_factory=lambda: dict(DEFAULT_MODELS), help="The models to train as JSON, model name "
        "-> peak learning rate in (0, 1); any hpa.models create_model name, e.g. {\"resnet18\": 0.001, "
        "\"se_resnet18\": 0.001, \"densenet121\": 0.0003}.")
    train_folds: int = opt(1, "Folds trained per model (1 = one model per entry of models, the laptop default; 5 = a "
        "full 5-fold cross-validation). Their out-of-fold predictions are what the thresholds are fitted on; test "
        "predictions are averaged over the folds, then over the models.")
    loss: str = opt("bce", choices=("bce", "focal"), help="Training loss: bce or focal.")
    pos_weight: str = opt("none", choices=("none", "sqrt"), train_option=True, help="Per-class weight of the positive "
        "term of the loss: none, or sqrt = sqrt(negatives / positives) of each class in the training folds, clipped "
        "to [1, 10], which lifts the rare classes without letting a class with a handful of positives dominate.")
    tta: int = opt(2, "Dihedral test-time augmentations at prediction: 1, 2, 4 or 8.")
    threshold_mode: str = opt("prior", choices=("fitted", "global", "shrunk", "prior"), help=(
        "fitted = per-class thresholds that maximise validation F1; global = the threshold value for every class;"
        " shrunk = fitted thresholds pulled toward the global one by the evidence (n_pos / (n_pos + "
        "shrink_strength)), so rare classes do not get degenerate cuts; prior = each class predicted as often as "
        "in the training labels. Every reported validation score is out-of-sample (each fold, or each of 5 parts "
        "of a single fold, scored with thresholds fitted on the others)."))
    threshold: float = opt(0.3, "Global decision threshold in (0, 1), used when threshold_mode is global (and the "
        "target of shrunk).")
    shrink_strength: float = opt(10.0, "k of shrunk (>= 0): a class with k validation positives keeps half of its "
        "fitted threshold.")
    ensemble_method: str = opt("mean", choices=("mean", "weighted", "rank"), help="How the models are combined "
        "(after averaging each model's folds): mean, weighted (by out-of-sample val macro F1) or rank.")
    gpus: int = opt(0, "GPUs per training pod (0 = CPU only: no accelerator limit and the CPU image; > 0: the CUDA "
        "image).")
    accelerator_type: str = opt("nvidia.com/gpu", "Kubernetes resource name of the accelerator, e.g. nvidia.com/gpu "
        "or amd.com/gpu.")
    num_nodes: int = opt(1, "Training nodes per model. The single-pod pipeline (hpa-pipeline) takes 1 only; the "
        "multi-node pipeline (hpa-pipeline-multinode) trains each model as a DDP TrainJob (Kubeflow Trainer, "
        "torch-distributed runtime) on num_nodes pods with `gpus` GPUs each.")
    kaggle_submit: bool = opt(False, "Upload submission.csv to Kaggle (needs the kaggle-credentials secret).")
    plot_samples: bool = opt(True, "Render a montage of sample images with their labels after download.")
    seed: int = opt(0, "Random seed for data generation, split and training.")
    weights: str = opt("", "Initial weights per model, as JSON model name -> source, e.g. {\"resnet18\": "
        "\"s3://bucket/r18.pt\", \"se_resnet18\": \"imagenet\"}: imagenet = timm's ImageNet weights (the pods need "
        "the model hub, e.g. huggingface.co), or a 3-channel state dict file / s3:// URI of that architecture "
        "(readable with the run's store keys; checked against the model before any download); the stem becomes 4 "
        "channels (yellow = mean of RGB). Models not named, and an empty value, start from random init; the bare "
        "word imagenet means ImageNet for every model.")

    def validate(self) -> "PipelineConfig":
        """Raise ConfigError (one line naming the parameter) for a value out of range; return self.

        Called client side by `pipeline.py run --local|submit` and, in a cluster, by the pipeline's
        first task, so that a bad run parameter fails before any data is downloaded or any GPU used.
        """
        def need(ok: bool, name: str, expected: str) -> None:
            require(ok, f"pipeline parameter {name}={getattr(self, name)!r}: expected {expected}")

        need(bool(self.data_source.strip()), "data_source",
             "synthetic, a directory, s3://..., https://... or kaggle:<competition>")
        need(bool(self.store_uri.strip()), "store_uri", "a store URI such as s3://bucket/prefix or a local directory")
        unplaced = self.store_uri.replace(NAMESPACE_FIELD, "")
        need("{" not in unplaced and "}" not in unplaced, "store_uri",
             f"a store URI whose only placeholder is {NAMESPACE_FIELD}")
        need(self.n_train >= 0, "n_train", "an integer >= 0 (0 = all images of a real dataset)")
        need(self.n_test >= 0, "n_test", "an integer >= 0 (0 = all images of a real dataset)")
        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size",
             "a positive multiple of 32 (32, 64, ..., 512)")
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
        need(self.tta in (1, 2, 4, 8), "tta", "1, 2, 4 or 8 dihedral transforms")
        need(0.0 < self.threshold < 1.0, "threshold", "a decision threshold in (0, 1)")
        need(self.shrink_strength >= 0 and self.shrink_strength == self.shrink_strength, "shrink_strength",
             "a number >= 0 (k of shrunk: a class with k validation positives keeps half its fitted threshold)")
        need(self.gpus >= 0, "gpus", "an integer >= 0")
        need(bool(self.accelerator_type.strip()), "accelerator_type",
             "a Kubernetes resource name such as nvidia.com/gpu")
        need(self.num_nodes >= 1, "num_nodes", "an integer >= 1")
        need(self.seed >= 0, "seed", "an integer >= 0")
        from hpa.download import check_sources  # config is imported below download today: the circle of issue 23

        self.weights_by_model()  # one ConfigError line naming weights[<model>] (hpa.weights)
        check_sources(self.data_source, self.merge_with, require_test=True)  # before anything is fetched
        for f in fields(self):  # the parameters that declare their values (opt(..., choices=...))
            choices = f.metadata.get("choices")
            need(choices is None or getattr(self, f.name) in choices, f.name, spoken([repr(c) for c in choices or ()]))
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
        task of the pipeline's ParallelFor, {"arch", "fold", "weights"} (weights: that model's own source, issue 22
        item 4: one file cannot start two architectures); the learning rate comes from `models` (or Katib).
        Models in name order: a JSON object run parameter reaches the task as a protobuf Struct, whose key
        order is not kept."""
        folds = [(self.val_fold + k) % self.folds for k in range(self.train_folds)]
        weights = self.weights_by_model()
        return [{"arch": arch, "fold": fold, "weights": weights[arch]}
                for arch in sorted(self.models) for fold in folds]

    def weights_by_model(self) -> dict[str, str]:
        """Each model's initial weights source ("" = random init), from the weights run parameter."""
        from hpa.weights import weights_by_model

        return weights_by_model(self.weights, sorted(self.models))


@dataclass
class ClusterParameters:
    """The run parameters that are not PipelineConfig fields: how the run reaches the cluster's services (the
    store's endpoint, Katib, Kubeflow Tensorboards) and where its training pods go. Declared here, beside
    PipelineConfig, so that pipeline.py builds the pipeline's signature and its UI descriptions from both."""

    s3_endpoint: str = opt(S3_DEFAULT_ENDPOINT, "S3 endpoint host:port of the store (KFP's SeaweedFS by default); keys "
        "come from the mlpipeline-minio-artifact secret.")
    tune: bool = opt(False, "Run Katib first (needs Katib in the cluster): one Experiment per model tunes its learning "
        "rate and the threshold policy (threshold_mode, threshold, shrink_strength), each trial scored "
        "out-of-sample; training and the ensemble then use the best values.")
    tensorboard: bool = opt(True, "Live training curves: a Kubeflow Tensorboard (Central Dashboard > Tensorboards), "
        "with the PodDefault that gives it the store's keys, reading the event files every training task streams to "
        "<store_uri>/tensorboard/<arch>-fold<k>-<digest of its inputs> (loss, lr, throughput every 10 steps; val "
        "loss, out-of-sample macro F1 and per-class F1 every epoch). The prefix is the same in every run, so training "
        "tasks stay cached across runs; false keeps the event files in each task's run artifact only.")
    resume_from_store: bool = opt(True, "Training tasks keep their checkpoints in <store_uri>/checkpoints/<key of the "
        "training>/, so a retried pod (preempted, evicted) resumes where the last one stopped and an identical "
        "finished training is reused; false keeps them in the pod (run --local's default: it neither retries nor is "
        "preempted, and skips the uploads).")
    node_selector: dict = opt(default_factory=dict, help="Node labels for the training pods as JSON, e.g. "
        "{\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}; {} = anywhere.")
    tolerations: list = opt(default_factory=list, help="Tolerations for the training pods as a JSON list, e.g. "
        "[{\"key\": \"nvidia.com/gpu\", \"operator\": \"Exists\", \"effect\": \"NoSchedule\"}]; [] = none.")


def train_options(cfg: PipelineConfig) -> dict:
    """The run parameters declared `opt(..., train_option=True)`: options of `python -m hpa train` (TrainConfig
    fields of the same name) that check-params hands every training task, Katib trial and TrainJob as one
    `train_options` object, so that a new one needs no new input on those components."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("train_option")}


def pipeline_default(name: str, help: str | None = None):
    """A dataclass field whose default is PipelineConfig's `name` (read when the config is made) and whose help is
    `help`, else the run parameter's description: the launchers' configs follow the run's defaults."""
    return opt(default_factory=lambda: getattr(PipelineConfig(), name),
               help=help if help is not None else help_of(PipelineConfig, name))


@dataclass
class TrainJobArgs:
    """The `python -m hpa train` arguments that the in-cluster launchers (Katib trials, multi-node
    jobs) fix for every pod; defaults follow PipelineConfig so that every rendered manifest agrees."""

    data: str = opt(default_factory=lambda: f"{PipelineConfig().store_uri}/data",
                    help="dataset root or packed shards root of the trials / job pods (--data of hpa train)")
    split: str = opt(default_factory=lambda: f"{PipelineConfig().store_uri}/split/split.csv",
                     help="split CSV (Id,Target,fold) the pods read (--split of hpa train)")
    fold: int = pipeline_default("val_fold", help="validation fold (--fold of hpa train)")
    arch: str = opt("resnet18", "model architecture, an hpa.models name (--arch of hpa train)")
    size: int = pipeline_default("image_size", help="image side in pixels (--size of hpa train)")
    epochs: int = pipeline_default("epochs", help="training epochs (--epochs of hpa train)")
    batch_size: int = pipeline_default("batch_size", help="batch size per process (--batch-size)")
    color_mode: str = pipeline_default("color_mode", help="rgby or rgb (--color-mode of hpa train)")
    loss: str = pipeline_default("loss", help="bce or focal (--loss of hpa train)")
    seed: int = pipeline_default("seed", help="random seed (--seed of hpa train)")
    weights: str = opt("", "initial weights of this model: empty (random init), imagenet, a file or s3:// URI")
    train_options: dict = opt(default_factory=dict, help="further hpa train options, option name -> value (the "
                              "pipeline's train_options: run parameters declared train_option=True)")

    def fixed_train_args(self) -> list[str]:
        return ["--data", self.data, "--split", self.split, "--fold", str(self.fold), "--arch", self.arch,
                "--size", str(self.size), "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
                "--color-mode", self.color_mode, "--loss", self.loss, "--seed", str(self.seed),
                *(["--weights", self.weights] if self.weights else []), *option_args(self.train_options)]


def option_args(options: dict) -> list[str]:
    """{"pos_weight": "sqrt", "amp": False} -> ["--pos-weight", "sqrt", "--no-amp"] (hpa train's flags)."""
    args: list[str] = []
    for name, value in sorted(options.items()):
        flag = name.replace("_", "-")
        args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return args


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


def check_params_task(params: dict, multi_node: bool, cpu_image: str, cuda_image: str, namespace: str) -> dict:
    """The check-params component: the run parameters among `params` (input name -> value) validated as a
    PipelineConfig, and what the later tasks need from them, in the component's output order: the parameters as
    JSON, pod_settings' store_uri, gpu_limit and train_image, the training plan, the train_options and the training
    tasks' checkpoint prefix (the store, or "" when `params["resume_from_store"]` is false)."""
    import json
    from dataclasses import asdict

    cfg = PipelineConfig(**{k: v for k, v in params.items() if k in PipelineConfig.__dataclass_fields__}).validate()
    from hpa.weights_check import check_weights  # reads the weights files; see validate() for the import circle

    check_weights(cfg.weights, sorted(cfg.models))  # a file that does not fit its model fails before any download
    settings = pod_settings(cfg, multi_node=multi_node, namespace=namespace, cpu_image=cpu_image,
                            cuda_image=cuda_image)
    print(json.dumps(settings, sort_keys=True))
    return {"params": json.dumps(asdict(cfg), sort_keys=True), **settings, "train_plan": cfg.train_plan(),
            "train_options": train_options(cfg),
            "checkpoint_uri": settings["store_uri"] if params.get("resume_from_store", True) else ""}
