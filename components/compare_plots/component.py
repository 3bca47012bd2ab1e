"""KFP component `compare-plots`: side-by-side training curves and per-class F1 of every trained model and fold.

The HTML report (images embedded) shows in the KFP UI's visualization tab; the Markdown table of
final metrics too. `python components/compare_plots/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from typing import List

from kfp.dsl import HTML, Artifact, Input, Markdown, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa compare-plots --runs runs/resnet18 runs/se_resnet18 --out compare/   # names: <arch>-fold<k> from config.json
"""
PIPELINE_EXAMPLE = r"""
compare_plots(runs=dsl.Collected(trained.outputs["run"]))
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def compare_plots(
    runs: Input[List[Artifact]],
    report: Output[HTML],
    summary: Output[Markdown],
    plots: Output[Artifact],
):
    """Compare the training runs: loss and val macro F1 per epoch (out-of-sample and in-sample), per-class F1, F1 vs threshold.

    Args:
        runs: Run directories of the training tasks (their `run` outputs), named <arch>-fold<k> from each run's config.json.
        report: Self-contained HTML report with every figure embedded.
        summary: Markdown table of each run's final metrics.
        plots: Directory of the PNG figures.
    """
    import shutil

    from hpa.compare_plots import compare_runs

    result = compare_runs([r.path for r in runs], plots.path)
    shutil.copyfile(result["report"], report.path)
    shutil.copyfile(result["summary"], summary.path)


if __name__ == "__main__":
    compiler.Compiler().compile(compare_plots, str(Path(__file__).with_name("component.yaml")))
