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
    assert names["int8 [tiny cpu generate:1/128/32] TTFT ms"]["range"].startswith("93% CI [")  # 5 repetitions: 93.75%
    assert names["int8 [tiny cpu generate:1/128/32] peak MiB"]["value"] == pytest.approx(400.0)
    assert "int8 [tiny cpu generate:1/128/32] KLD mean" in names
    up = {e["name"]: e for e in bigger}
    assert up["int8 [tiny cpu generate:1/128/32] decode tok/s"]["value"] == pytest.approx(150.0)
    assert not set(names) & set(up) and not any("broken" in n for n in [*names, *up])


def test_a_pytest_benchmark_entry_carries_the_cell_and_how_it_was_measured(run):
    from pytest_benchmark import __version__

    from bench.export import pytest_benchmark_json

    data = pytest_benchmark_json(run)
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    fp32 = records[0]
    entry = next(b for b in data["benchmarks"] if b["name"] == "ttft_ms[fp32]")
    scenario = "generate:1/128/32"
    assert {k: v for k, v in entry.items() if k != "stats"} == {
        "group": f"ttft_ms tiny cpu {scenario}", "name": "ttft_ms[fp32]",
        "fullname": f"infermatrix/tiny/cpu/{scenario}::ttft_ms[fp32]",
        "params": {"variant": "fp32", "device": "cpu", "batch_size": 1, "prompt_tokens": 128, "new_tokens": 32},
        "param": "fp32",
        "extra_info": {"cell_id": fp32["cell_id"], "metric": "ttft_ms", "unit": "s", "decode_tokens_per_s": 100.0,
                       "kld_mean": 0.0, "peak_memory_bytes": 400.0 * 2**20},
        "options": {"disable_gc": False, "timer": "perf_counter_ns", "min_rounds": 5, "max_time": 0.5, "min_time": 0,
                    "warmup": True}}
    assert entry["stats"]["data"] == pytest.approx([v / 1e3 for v in fp32["samples"]["ttft_ms"]])
    assert entry["stats"]["iterations"] == 1 and entry["stats"]["rounds"] == 5
    assert [b["name"] for b in data["benchmarks"]] == [f"{k}[{v}]" for v in ("fp32", "int8")
                                                       for k in ("ttft_ms", "tpot_ms", "e2e_ms")]
    # The machine and revision are the run's, not the exporting host's; commit times are not recorded.
    assert data["machine_info"] == {
        "node": "host", "processor": "Test CPU", "machine": "x86_64", "system": "Linux", "release": "6.1.0",
        "python_implementation": "CPython", "python_compiler": "GCC 12.2.0", "python_version": "3.11",
        "cpu": {"brand_raw": "Test CPU", "count": 2}, "gpus": []}
    assert data["commit_info"] == {"id": "0123456789abcdef", "dirty": False, "project": "infermatrix", "branch": "",
                                   "time": "", "author_time": ""}
    assert data["datetime"] == "2026-01-01T00:01:00Z" and data["version"] == __version__


def test_github_action_benchmark_entries_say_what_each_value_is(run):
    from bench.export import github_action_benchmark
    from optimize.errors import InputError

    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    cid = records[1]["cell_id"]
    smaller = {e["name"]: e for e in github_action_benchmark(run, "smaller")}
    prefix = "int8 [tiny cpu generate:1/128/32]"
    assert smaller[f"{prefix} TPOT ms"] == {"name": f"{prefix} TPOT ms", "unit": "ms",
                                           "value": pytest.approx(1e3 / 150), "range": "93% CI [6.54, 6.80]",
                                           "extra": f"cell {cid}; p50 over repetitions"}
    # Scaled figures take the unit their label shows; a figure with no interval has no range.
    assert smaller[f"{prefix} peak MiB"] == {"name": f"{prefix} peak MiB", "unit": "MiB", "value": 400.0,
                                            "extra": f"cell {cid}"}
    bigger = {e["name"]: e for e in github_action_benchmark(run, "bigger")}
    assert bigger[f"{prefix} top-1"] == {"name": f"{prefix} top-1", "unit": "fraction", "value": 0.99,
                                        "extra": f"cell {cid}"}
    with pytest.raises(InputError, match="^--direction must be smaller or bigger, got 'up'$"):
        github_action_benchmark(run, "up")


@pytest.mark.parametrize(("reps", "label"), [(1, None), (3, "75% CI"), (5, "93% CI"), (9, "95% CI")])
def test_an_exported_range_says_how_sure_it_is(tmp_path, reps, label):
    from bench.catalogue import interval_coverage
    from bench.export import github_action_benchmark

    rec = record("int8", reps=reps)
    run = write_run(tmp_path / "run", [rec])
    entries = {e["name"].split("] ", 1)[1]: e for e in github_action_benchmark(run, "smaller")}
    tpot, cid = entries["TPOT ms"], rec["cell_id"]
    coverage = interval_coverage(rec, "tpot_ms")
    if label is None:  # one repetition: [x, x] would chart as certainty
        assert coverage == 0 and "range" not in tpot
        assert tpot["extra"] == f"cell {cid}; p50 over repetitions; one repetition: no interval"
    else:  # the label never claims more than the order statistics give
        assert tpot["range"].startswith(f"{label} [") and int(label[:2]) <= round(coverage * 100)
        assert tpot["extra"] == f"cell {cid}; p50 over repetitions"
    # A mean's interval from its standard error is a 95% one whatever the repetitions.
    assert entries["KLD mean"]["range"].startswith("95% CI [")


def test_scaled_metrics_show_the_unit_their_label_ends_in():
    from bench.catalogue import METRICS

    scaled = {k: m.shown_unit for k, m in METRICS.items() if m.scale != 1}
    assert scaled and set(scaled.values()) == {"MiB"}  # "RSS before load MiB", "serving peak MiB", ...
    assert METRICS["tpot_ms"].shown_unit == "ms" and METRICS["decode_tokens_per_s"].shown_unit == "tokens/s"


def test_a_run_with_gpus_a_dirty_tree_and_a_failed_first_cell(tmp_path):
    from bench.export import github_action_benchmark, pytest_benchmark_json
    from bench.results import RUN, write_json_atomic

    no_ttft = record("int8")
    del no_ttft["samples"]["ttft_ms"]  # the other latencies still go
    run = write_run(tmp_path / "run", [record("broken", status="failed"), record("fp32", steps=0), no_ttft])
    meta = json.loads((run / RUN).read_text())
    meta["environment"]["gpus"] = [{"name": "NVIDIA H200", "driver": "580.1"}, {"name": "NVIDIA H100"}]
    meta["environment"]["git"]["dirty"] = True
    del meta["ended"]
    write_json_atomic(run / RUN, meta)
    data = pytest_benchmark_json(run)
    assert [b["name"] for b in data["benchmarks"]] == ["ttft_ms[fp32]", "tpot_ms[fp32]", "e2e_ms[fp32]",
                                                       "tpot_ms[int8]", "e2e_ms[int8]"]
    assert data["machine_info"]["gpus"] == ["NVIDIA H200", "NVIDIA H100"]
    assert data["commit_info"]["dirty"] is True
    assert data["datetime"] == "2026-01-01T00:00:00Z"  # no end recorded: the start
    assert [e["name"].split()[0] for e in github_action_benchmark(run, "smaller")][:1] == ["fp32"]


def test_a_run_recorded_without_environment_or_method_still_exports(tmp_path):
    import datetime

    from bench.export import pytest_benchmark_json
    from bench.results import RUN, write_json_atomic

    bare = record("fp32", steps=0)
    del bare["method"]
    run = write_run(tmp_path / "run", [bare])
    meta = json.loads((run / RUN).read_text())
    for key in ("environment", "started", "ended"):
        del meta[key]
    write_json_atomic(run / RUN, meta)
    before = datetime.datetime.now(datetime.timezone.utc)
    data = pytest_benchmark_json(run)
    info = data["machine_info"]
    assert {k: v for k, v in info.items() if k != "cpu"} == {
        "node": "", "processor": "", "machine": "", "system": "", "release": "", "python_implementation": "",
        "python_compiler": "", "python_version": "", "gpus": []}  # nothing recorded: nothing of the exporting host
    assert info["cpu"] == {"brand_raw": "", "count": None}
    assert data["commit_info"] == {"id": "", "dirty": False, "project": "infermatrix", "branch": "", "time": "",
                                   "author_time": ""}
    stamp = datetime.datetime.fromisoformat(data["datetime"])  # when exported, in UTC
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert before <= stamp <= datetime.datetime.now(datetime.timezone.utc)
    assert data["benchmarks"][0]["options"] == {"disable_gc": False, "timer": "perf_counter", "min_rounds": None,
                                                "max_time": None, "min_time": 0, "warmup": False}


@pytest.mark.parametrize("direction", ["smaller", "bigger"])
def test_direction_with_pytest_benchmark_is_refused_not_ignored(run, tmp_path, capsys, direction):
    out = tmp_path / "bench.json"
    assert main(["export", str(run), "--to", "pytest-benchmark", "--direction", direction, "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("infermatrix export: error: --direction is for --to github-action-benchmark "
                                       "only, not --to pytest-benchmark\n")
    assert not out.exists()


@pytest.mark.parametrize(("argv", "needle"), [(["", "--to", "pytest-benchmark"], "argument run: RUN must not be empty"),
                                              (["RUN", "--to", "pytest-benchmark", "--out", ""],
                                               "argument --out: --out must not be empty")])
def test_an_empty_run_or_out_is_refused_not_taken_as_the_working_directory(run, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(["export", *[str(run) if a == "RUN" else a for a in argv]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_the_commit_exported_is_the_one_measured_an_ab_sides_or_the_users_repository(tmp_path):
    """Both sides of an ab run once exported the harness's own commit; a pip-installed harness exported ""."""
    from bench.export import pytest_benchmark_json
    from bench.results import RUN, write_json_atomic

    run = write_run(tmp_path / "run", [record("fp32", steps=0)])
    meta = json.loads((run / RUN).read_text())
    meta["environment"]["git"] = None  # an installed harness
    meta["environment"]["user_repository"] = {"path": "/src/app", "commit": "feedface" * 5, "dirty": True}
    write_json_atomic(run / RUN, meta)
    assert pytest_benchmark_json(run)["commit_info"] == {
        "id": "feedface" * 5, "dirty": True, "project": "infermatrix", "branch": "", "time": "", "author_time": ""}
    meta["ab"] = {"side": "head", "rev": "HEAD~1", "commit": "c0ffee00" * 5, "rounds": 2, "seed": 0}
    write_json_atomic(run / RUN, meta)
    assert pytest_benchmark_json(run)["commit_info"] == {
        "id": "c0ffee00" * 5, "dirty": False, "project": "infermatrix", "branch": "HEAD~1", "time": "",
        "author_time": ""}  # a worktree of the commit: clean, whatever the checkout it was made from
