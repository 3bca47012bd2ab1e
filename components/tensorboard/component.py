"""KFP component `tensorboard`: a Kubeflow Tensorboard for this pipeline run's live training curves.

It picks the run's logs prefix, `<store_uri>/tensorboard/<run id>`, returns it for the training tasks (each
writes its TensorBoard event files under `<logs_uri>/<arch>-fold<fold>/` while it trains) and creates a
`Tensorboard` (tensorboard.kubeflow.org/v1alpha1) whose `spec.logspath` is that prefix, so every model x fold
of the run shows as one TensorBoard run in the Central Dashboard's TensorBoards app, live. The resource is not
owned by the run: it stays for looking at the curves afterwards (delete it in the TensorBoards app). The
pipeline's service account needs create/get on tensorboards.tensorboard.kubeflow.org (kubeflow-edit has it);
the TensorBoard server reads the store with the keys of the PodDefault `hpa-kfp-tensorboard-s3`, which an
admin applies once per namespace (`python -m hpa tensorboard --poddefault`, see docs/cluster.md). Outside a
cluster pod (kfp.local) nothing is created; without `required`, a refusal by the cluster is a warning, not a
failed run. `python components/tensorboard/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa tensorboard --logs s3://mlpipeline/private/team-a/hpa-kfp/tensorboard/RUN_ID --name hpa-run-id \
    --namespace team-a --dry-run                    # the manifest; without --dry-run it is created
python -m hpa tensorboard --poddefault --namespace team-a | kubectl apply -f -   # once per namespace, by an admin
tensorboard --logdir runs/resnet18/tensorboard     # a local run's event files (<out>/tensorboard)
"""
PIPELINE_EXAMPLE = r"""
board = tensorboard(store_uri=checked.outputs["store_uri"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
board.set_caching_options(False)  # creates a cluster object: never cached
with dsl.ParallelFor(checked.outputs["train_plan"], name="models-x-folds") as item:
    trained = train(..., arch=item.arch, fold=item.fold, tensorboard_uri=board.outputs["logs_uri"])
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def tensorboard(
    store_uri: str,
    run_id: str,
    name: str = "",
    namespace: str = "",
    required: bool = False,
    enabled: bool = True,
) -> NamedTuple("Outputs", [("logs_uri", str), ("tensorboard_path", str)]):
    """Create a Kubeflow Tensorboard for this run's logs prefix and return the prefix for the training tasks.

    Args:
        store_uri: Store prefix of the run ({namespace} resolved: check-params' store_uri); the logs go under <store_uri>/tensorboard/<run_id>.
        run_id: The pipeline run's id: pass dsl.PIPELINE_JOB_ID_PLACEHOLDER (the backend driver resolves it only as the whole value).
        name: Tensorboard name (a DNS-1035 label); empty = hpa-<run_id>.
        namespace: Namespace of the Tensorboard; empty = the namespace this task runs in.
        required: Fail the task when the cluster refuses the Tensorboard (no CRD, no permission); false = log a warning and go on.
        enabled: false = create nothing and return an empty logs_uri: the training tasks then keep their event files in their run artifact only, and stay cacheable across runs (a per-run logs_uri is a new input every run, so a training task that gets one is never a cache hit).
        logs_uri: The run's logs prefix; give it to the training tasks' tensorboard_uri.
        tensorboard_path: The Tensorboard's path on the Kubeflow gateway, /tensorboard/<namespace>/<name>/ (empty when none was created).
    """
    from collections import namedtuple

    from hpa.tensorboard import tensorboard_task

    logs_uri, path = tensorboard_task(store_uri, run_id, name, namespace, required=required, enabled=enabled)
    return namedtuple("Outputs", ["logs_uri", "tensorboard_path"])(logs_uri, path)


if __name__ == "__main__":
    compiler.Compiler().compile(tensorboard, str(Path(__file__).with_name("component.yaml")))
