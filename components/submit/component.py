"""KFP component `submit`: the Kaggle submission file, validated, scored when labels exist, optionally uploaded.

Never cached: an upload is a side effect. Kaggle credentials come from the `kaggle-credentials`
secret as KAGGLE_USERNAME / KAGGLE_KEY (set on the task in pipeline.py), never from a parameter.
`python components/submit/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa submit --predictions ensemble/ensemble_test.npz --thresholds ensemble/thresholds.json \
    --sample-submission sample_submission.csv --out submission.csv
"""
PIPELINE_EXAMPLE = r"""
submit(data_uri=data.outputs["data_uri"], predictions=combined.outputs["ensemble_test"],
       thresholds=combined.outputs["thresholds"], kaggle_submit=False)
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def submit(
    data_uri: str,
    predictions: Input[Dataset],
    thresholds: Input[Dataset],
    submission: Output[Dataset],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    kaggle_submit: bool = False,
    s3_endpoint: str = "",
):
    """Write submission.csv (Id,Predicted) in the sample's order and validate it against the sample.

    Args:
        data_uri: URI of the committed dataset (reads sample_submission.csv and, if present, test_labels.csv).
        predictions: Test probabilities (.npz) from the ensemble task.
        thresholds: Thresholds JSON from the ensemble task.
        submission: The Kaggle submission CSV.
        summary: Markdown summary: rows, labels per image, score when test labels are known.
        metrics: Test macro F1 when the dataset has test labels (synthetic data).
        kaggle_submit: Upload to Kaggle with KAGGLE_USERNAME/KAGGLE_KEY from the environment.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
    """
    from hpa.store import use_endpoint
    from hpa.submit import submit_task

    use_endpoint(s3_endpoint)
    numbers, markdown = submit_task(predictions.path, thresholds.path, data_uri, submission.path, kaggle_submit)
    for key, value in numbers.items():
        metrics.log_metric(key, value)
    with open(summary.path, "w") as f:
        f.write(markdown)
    submission.metadata.update({"kaggle_submit": kaggle_submit})


if __name__ == "__main__":
    compiler.Compiler().compile(submit, str(Path(__file__).with_name("component.yaml")))
