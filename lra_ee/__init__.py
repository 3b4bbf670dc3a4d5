"""lra_ee: the LRA-EE method, offline — QIRC diagnostics, gate training, INR-calibrated
thresholds, evaluation with statistics and ablations, reports, and the ``lra-ee`` command line.

    from lra_ee import calibrate, evaluate_model
    qvit, report = calibrate(clip.visual, calib_source, text_features, scheme="smoothquant")
    result = evaluate_model(qvit, eval_source, fp32_visual=clip.visual)
"""

from .api import calibrate, evaluate_model
from .experiment import ExperimentConfig, run_experiment

__all__ = ["calibrate", "evaluate_model", "run_experiment", "ExperimentConfig"]
