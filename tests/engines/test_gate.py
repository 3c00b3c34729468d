"""`cqil gate`: pass/fail on constructed bench results, exit codes 0/1/2, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from cqil.pipeline.cli import main


def bench(ratios: dict[str, float], ideal: float = 0.6) -> dict:
    def stats(ms):
        return {"p50_ms": ms, "p90_ms": ms * 1.1, "p99_ms": ms * 1.3, "n": 100}

    return {"format": "cqil-bench/1", "ideal_depth_ratio": ideal,
            "scenarios": {name: {"shape": {"batch": 1}, "reference": stats(10.0), "candidate": stats(10.0 * r),
                                 "ratio": r, "ratio_ci": [r * 0.98, r * 1.02]} for name, r in ratios.items()}}


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def junit(path):
    root = ET.parse(path).getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    return root, cases


def test_max_ratio_pass_and_fail(tmp_path, capsys):
    new = write(tmp_path, "new.json", bench({"prefill": 0.70, "decode": 0.82}))
    report = tmp_path / "gate.xml"
    assert main(["gate", new, "--max-ratio", "0.85", "--junit", str(report)]) == 0
    root, cases = junit(report)
    assert root.get("failures") == "0" and set(cases) == {"prefill", "decode"}
    assert not list(root.iter("failure"))

    assert main(["gate", new, "--max-ratio", "0.8", "--junit", str(report), "--json", str(tmp_path / "g.json")]) == 1
    root, cases = junit(report)
    assert root.get("failures") == "1"
    assert cases["decode"].find("failure") is not None and cases["prefill"].find("failure") is None
    assert "0.8200" in cases["decode"].find("failure").get("message")
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["passed"] is False and [c["passed"] for c in result["checks"]] == [True, False]
    assert "FAIL decode" in capsys.readouterr().out


def test_baseline_with_tolerance(tmp_path):
    old = write(tmp_path, "old.json", bench({"prefill": 0.70, "decode": 0.80}))
    within = write(tmp_path, "within.json", bench({"prefill": 0.73, "decode": 0.83}))  # +4.3%, +3.75%
    worse = write(tmp_path, "worse.json", bench({"prefill": 0.70, "decode": 0.85}))  # decode +6.25%
    assert main(["gate", within, "--baseline", old]) == 0  # default tolerance 5%
    assert main(["gate", worse, "--baseline", old]) == 1
    assert main(["gate", worse, "--baseline", old, "--tolerance", "0.1"]) == 0
    assert main(["gate", within, "--baseline", old, "--tolerance", "0"]) == 1


@pytest.mark.parametrize("case", ["missing", "not_json", "bad_schema", "scenario_missing", "tolerance_alone"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    good = write(tmp_path, "good.json", bench({"decode": 0.8}))
    args = {
        "missing": [str(tmp_path / "nope.json"), "--max-ratio", "1"],
        "not_json": [write(tmp_path, "x.json", "{not json"), "--max-ratio", "1"],
        "bad_schema": [write(tmp_path, "s.json", {"scenarios": {"decode": {"ratio": 1}}, "ideal_depth_ratio": 1}),
                       "--max-ratio", "1"],
        "scenario_missing": [good, "--baseline", write(tmp_path, "b.json", bench({"decode": 0.8, "prefill": 0.7}))],
        "tolerance_alone": [good, "--max-ratio", "1", "--tolerance", "0.1"],
    }[case]
    assert main(["gate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cqil gate: error:") and "\n" not in err


def test_rule_is_required(tmp_path):
    good = write(tmp_path, "good.json", bench({"decode": 0.8}))
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        main(["gate", good])
    assert exc.value.code == 2


def test_a_ratio_exactly_on_the_limit_passes(tmp_path):
    on_limit = write(tmp_path, "on.json", bench({"prefill": 0.8, "decode": 0.75}))
    assert main(["gate", on_limit, "--max-ratio", "0.8"]) == 0
    assert main(["gate", on_limit, "--max-ratio", "0.7999"]) == 1
    old = write(tmp_path, "old.json", bench({"prefill": 0.5, "decode": 0.5}))
    assert main(["gate", write(tmp_path, "at.json", bench({"prefill": 0.625, "decode": 0.5})),
                 "--baseline", old, "--tolerance", "0.25"]) == 0  # 0.5 x 1.25 = 0.625 exactly
