"""scripts/readme_demo_table.py: the README's demo section is generated from a demo's report.json."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "readme_demo_table.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("readme_demo_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(acc_ee=0.613):
    q = {"both_right": 0.55, "rescued": 0.04, "hurt": 0.027, "both_wrong": 0.383}
    scheme = {"acc_fp32": 0.64, "acc_full": 0.6, "acc_ee": acc_ee, "delta": acc_ee - 0.6, "delta_ci95": [-0.01, 0.04],
              "quadrants": q, "flops_saving": 0.123, "nsr_per_layer": [0.0, 0.1, 0.2]}
    nsr = [{"scheme": "fp32", "final_nsr": 0.0, "acc_full": 0.64, "acc_ee": 0.645, "rescued": 0.01, "hurt": 0.005,
            "rescued_minus_hurt": 0.005, "ci95": [-0.002, 0.012], "flops_saving": 0.05, "measured_by": "simulation"},
           {"scheme": "paper", "final_nsr": 0.2, "acc_full": 0.6, "acc_ee": acc_ee, "rescued": 0.04, "hurt": 0.027,
            "rescued_minus_hurt": 0.013, "ci95": [-0.01, 0.04], "flops_saving": 0.123, "measured_by": "executor"}]
    controls = {"rescued_minus_hurt_by_nsr": nsr,
                "random_gate": {"paper": {"random_mean": -0.02, "random_ci95": [-0.04, 0.0]}},
                "oracle": {"paper": {"exit_set": {"rescued": 0.09}}},
                "static_exit": {"paper": {"layers": {"1": {"delta": -0.3}, "2": {"delta": -0.1}}}},
                "head_confound": {"paper": {"delta": 0.01, "delta_ci95": [-0.02, 0.03]}},
                "batch_sensitivity": {"paper": {"acc_full_range": [0.58, 0.61], "acc_ee_range": [0.6, 0.62], "n": 64}}}
    return {"schemes": {"paper": scheme}, "controls": controls, "n_eval": 250, "seeds": [0, 1, 2], "flags": [],
            "throughput": {"img_per_s": {"fp32": 20.0, "int8": 110.0}, "batch_size": 32, "threads": 2},
            "seconds_total": 141.2}


def test_render_reads_every_number_from_the_report(script):
    text = script.render(_report())
    row = "| the paper's INT8 (`quantize_dynamic` emulation) | 64.0% | 60.0% | 61.3% | +1.30 pp [−1.00, +4.00] |"
    assert row in text
    assert "4.0% / 2.7% | 12.3% | 20.0% |" in text and "NSR after block 2" in text
    assert "| early exit: rescued − hurt (95% CI) | +0.50 pp [−0.20, +1.20] | +1.30 pp [−1.00, +4.00] |" in text
    assert "−2.00 pp [−4.00, +0.00]" in text and "| 9.0% |" in text and "−10.00 pp (block 2)" in text
    assert "INT8 full 58.0%..61.0%, EE 60.0%..62.0% (64 images)" in text and "took 141 s" in text
    assert "random weights" in text


def test_readme_section_is_replaced_and_checked(script, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{script.BEGIN}\nold table\n{script.END}\noutro\n")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    assert script.main(["--report", str(report), "--readme", str(readme), "--check"]) == 1
    assert script.main(["--report", str(report), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old table" not in text
    assert script.main(["--report", str(report), "--readme", str(readme), "--check"]) == 0
    report.write_text(json.dumps(_report(acc_ee=0.62)))
    assert script.main(["--report", str(report), "--readme", str(readme), "--check"]) == 1
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="demo-table"):
        script.main(["--report", str(report), "--readme", str(readme)])
