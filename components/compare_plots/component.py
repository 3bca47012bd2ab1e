"""KFP component `compare-plots`: side-by-side training curves and per-class F1 of two runs.

The HTML report (images embedded) shows in the KFP UI's visualization tab; the Markdown table of
final metrics too. `python components/compare_plots/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa compare --runs runs/resnet18 runs/se_resnet --names resnet18 se_resnet --out compare/
"""
PIPELINE_EXAMPLE = r"""
compare_plots(run_a=resnet.outputs["run"], run_b=se_resnet.outputs["run"], name_a="resnet18", name_b="se_resnet")
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def compare_plots(
    run_a: Input[Artifact],
    run_b: Input[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
    plots: Output[Artifact],
    name_a: str = "resnet18",
    name_b: str = "se_resnet",
):
    """Compare two training runs: loss and val macro F1 per epoch, per-class F1, F1 vs threshold.

    Args:
        run_a: Run directory of the first model (a train task's `run` output).
        run_b: Run directory of the second model.
        report: Self-contained HTML report with every figure embedded.
        summary: Markdown table of each run's final metrics.
        plots: Directory of the PNG figures.
        name_a: Name of the first run in legends.
        name_b: Name of the second run in legends.
    """
    import shutil

    from hpa.plots import compare_runs

    result = compare_runs([run_a.path, run_b.path], plots.path, names=[name_a, name_b])
    shutil.copyfile(result["report"], report.path)
    shutil.copyfile(result["summary"], summary.path)


if __name__ == "__main__":
    compiler.Compiler().compile(compare_plots, str(Path(__file__).with_name("component.yaml")))
