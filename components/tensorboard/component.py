"""KFP component `tensorboard`: a Kubeflow Tensorboard that shows every training of the store, live.

It returns the training tasks' logs prefix, `<store_uri>/tensorboard`, the same in every run (each training task
writes its event files under `<logs_uri>/<arch>-fold<fold>-<digest of its inputs>/` while it trains, so a task
that gets it stays a KFP cache hit across runs, and a cache hit's curves are still there), creates in the run's
namespace the PodDefault `hpa-kfp-tensorboard-s3`, which gives the Tensorboard's server the S3 keys of the
namespace's `mlpipeline-minio-artifact` secret (by secretKeyRef), and then a `Tensorboard`
(tensorboard.kubeflow.org/v1alpha1) whose `spec.logspath` is that prefix, so every model x fold shows as one
TensorBoard run in the Central Dashboard's TensorBoards app. Both are made once and kept by later runs; the
Tensorboard is not owned by a run (delete it in the TensorBoards app). The pipeline's service account
(default-editor) may create both through kubeflow-edit; where it may not create the PodDefault (no Jupyter web
app), one warning line names the admin's command. Outside a cluster pod (kfp.local) nothing is created; without
`required`, a refusal by the cluster is a warning, not a failed run. Never cache this task: it makes cluster
objects. `python components/tensorboard/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa tensorboard --logs s3://mlpipeline/private/team-a/hpa-kfp/tensorboard --namespace team-a \
    --dry-run                                       # the manifest; without --dry-run it is created, with its PodDefault
python -m hpa tensorboard --poddefault --namespace team-a | kubectl apply -f -   # once per namespace, by an admin
tensorboard --logdir runs/resnet18/tensorboard     # a local run's event files (<out>/tensorboard)
"""
PIPELINE_EXAMPLE = r"""
board = tensorboard(store_uri=checked.outputs["store_uri"], s3_endpoint=s3_endpoint)
board.set_caching_options(False)  # makes cluster objects: never cached
with dsl.ParallelFor(checked.outputs["train_plan"], name="models-x-folds") as item:
    trained = train(..., arch=item.arch, fold=item.fold, tensorboard_uri=board.outputs["logs_uri"])
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def tensorboard(
    store_uri: str,
    name: str = "",
    namespace: str = "",
    s3_endpoint: str = "",
    required: bool = False,
    enabled: bool = True,
) -> NamedTuple("Outputs", [("logs_uri", str), ("tensorboard_path", str)]):
    """Make the Tensorboard (and its PodDefault) for the store's logs prefix and return the prefix for the training tasks.

    Args:
        store_uri: Store prefix of the run ({namespace} resolved: check-params' store_uri); the logs prefix is <store_uri>/tensorboard, the same in every run.
        name: Tensorboard name (a DNS-1035 label); empty = hpa-kfp-<8 hex of the logs prefix's sha256>, one per store.
        namespace: Namespace of the Tensorboard and the PodDefault; empty = the namespace this task runs in.
        s3_endpoint: S3 endpoint host:port the Tensorboard's server reads (the PodDefault's S3_ENDPOINT; https:// for TLS); empty = KFP's SeaweedFS.
        required: Fail the task when the cluster refuses the Tensorboard or the PodDefault (no CRD, no permission); false = one warning line and go on.
        enabled: false = make nothing and return an empty logs_uri: the training tasks keep their event files in their run artifact only.
        logs_uri: The training tasks' logs prefix, <store_uri>/tensorboard; give it to their tensorboard_uri.
        tensorboard_path: The Tensorboard's path on the Kubeflow gateway, /tensorboard/<namespace>/<name>/ (empty when none was made).
    """
    from collections import namedtuple

    from hpa.tensorboard import tensorboard_task

    logs_uri, path = tensorboard_task(store_uri, name=name, namespace=namespace, s3_endpoint=s3_endpoint,
                                      required=required, enabled=enabled)
    return namedtuple("Outputs", ["logs_uri", "tensorboard_path"])(logs_uri, path)


if __name__ == "__main__":
    compiler.Compiler().compile(tensorboard, str(Path(__file__).with_name("component.yaml")))
