"""Exports load in the tools they are for: pytest-benchmark's storage and compare, github-action-benchmark."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from bench.cli import main
from tests.bench.records import record, write_run


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", [record("fp32", decode=100, kld=0.0, steps=0), record("int8", decode=150),
                                        record("broken", status="failed")])


def test_pytest_benchmark_export_round_trips_through_its_loader(run, tmp_path):
    from pytest_benchmark.storage.file import FileStorage

    storage = tmp_path / "storage" / "Linux-CPython-3.11-64bit"
    storage.mkdir(parents=True)
    out = storage / "0001_infermatrix.json"
    assert main(["export", str(run), "--to", "pytest-benchmark", "--out", str(out)]) == 0
    loaded = list(FileStorage(tmp_path / "storage", logger=logging.getLogger("pb")).load_benchmarks(str(out)))
    assert len(loaded) == 6  # TTFT, TPOT, e2e for each ok cell; the failed cell has no timings
    by_name = {(b["group"].split()[0], b["name"]): b for b in loaded}
    ttft = by_name[("ttft_ms", "ttft_ms[int8]")]
    samples_s = [v / 1e3 for v in json.loads((run / "results.jsonl").read_text().splitlines()[1])["samples"]["ttft_ms"]]
    assert ttft["data"] == pytest.approx(samples_s) and ttft["rounds"] == 5
    assert ttft["median"] == pytest.approx(sorted(samples_s)[2]) and ttft["ops"] == pytest.approx(1 / ttft["mean"])
    # The user's path: pytest-benchmark's own compare command renders the file.
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "--storage", str(tmp_path / "storage"), "compare",
                           str(out), "--group-by", "group"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ttft_ms[int8]" in proc.stdout and "e2e_ms[fp32]" in proc.stdout


def test_github_action_benchmark_lists_follow_the_catalogue_direction(run, tmp_path, capsys):
    assert main(["export", str(run), "--to", "github-action-benchmark"]) == 0
    smaller = json.loads(capsys.readouterr().out)
    assert main(["export", str(run), "--to", "github-action-benchmark", "--direction", "bigger"]) == 0
    bigger = json.loads(capsys.readouterr().out)
    for entry in smaller + bigger:
        assert set(entry) <= {"name", "unit", "value", "range", "extra"} and isinstance(entry["value"], float)
    names = {e["name"]: e for e in smaller}
    assert names["int8 [tiny cpu generate:1/128/32] TTFT ms"]["unit"] == "ms"
    assert names["int8 [tiny cpu generate:1/128/32] TTFT ms"]["range"].startswith("95% CI [")
    assert names["int8 [tiny cpu generate:1/128/32] peak MiB"]["value"] == pytest.approx(400.0)
    assert "int8 [tiny cpu generate:1/128/32] KLD mean" in names
    up = {e["name"]: e for e in bigger}
    assert up["int8 [tiny cpu generate:1/128/32] decode tok/s"]["value"] == pytest.approx(150.0)
    assert not set(names) & set(up) and not any("broken" in n for n in [*names, *up])
