"""The regression gate's statistics on samples with known distributions, and its CLI contract."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import gate_stats as gs
from bench.cli import main as cli
from bench.compare import compare_sides
from tests.bench.gate_helpers import ENV, lognormal, record, side, synthetic_run, timing_samples, write_run

# min_processes=1: the statistics alone decide, so one-process comparisons are tested too (stricter).
FAST = gs.GateConfig(n_resamples=1000, min_processes=1)


def processes(rng, rounds: int, reps: int, cv: float, slowdown: float = 1.0, variant: str = "fp32") -> list[dict]:
    return [record(variant, timing_samples(rng, reps, cv, slowdown)) for _ in range(rounds)]


def verdicts(comparison) -> dict[str, str]:
    return {f"{r.cell.split()[1]}:{r.metric}": r.verdict for r in comparison.rows}


@pytest.mark.parametrize("cv", [0.03, 0.06, 0.10])
def test_aa_pairs_are_never_regressed(cv):
    # 100 seeds per noise level, 300 in all; shapes of a plain run (1 process x 10) and of ab (2 x 5).
    rng = np.random.default_rng(int(cv * 1000))
    seen = set()
    for seed in range(100):
        rounds, reps = ((1, 10), (2, 5), (5, 10))[seed % 3]
        c = compare_sides(side(processes(rng, rounds, reps, cv)), side(processes(rng, rounds, reps, cv)), FAST)
        seen.update(r.verdict for r in c.rows)
        assert not c.regressed, (seed, [(r.metric, r.ratio, r.low, r.high, r.q) for r in c.regressed])
        assert c.exit_code() == 0
    assert "unchanged" in seen or cv > 0.05  # the band is reachable at low noise: the test can tell


@pytest.mark.parametrize(("cv", "rounds", "reps", "min_fraction"), [(0.03, 2, 5, 1.0), (0.10, 5, 10, 0.95)])
def test_twenty_percent_slowdown_is_regressed(cv, rounds, reps, min_fraction):
    # Two cells, fp32 slowed: the test on the processes' levels pools their spread over both cells (with one
    # cell and two processes a side it would have 2 degrees of freedom, and miss this change 16 times in 40).
    rng = np.random.default_rng(7)
    hits = 0
    for seed in range(40):
        base = side(processes(rng, rounds, reps, cv) + processes(rng, rounds, reps, cv, variant="bf16"))
        head = side(processes(rng, rounds, reps, cv, slowdown=1.2) + processes(rng, rounds, reps, cv, variant="bf16"))
        c = compare_sides(base, head, gs.GateConfig(n_resamples=1000, seed=seed, min_processes=1))
        v = verdicts(c)
        hits += v["fp32:tpot_ms"] == "regressed" and v["fp32:decode_tokens_per_s"] == "regressed"
        assert "improved" not in v.values() and not [r for r in c.regressed if "bf16" in r.cell]
        tpot = next(r for r in c.rows if r.metric == "tpot_ms")
        assert tpot.mde < 0.15  # the gate itself says a 20% change is within its reach here
    assert hits / 40 >= min_fraction


@pytest.mark.parametrize(("rounds", "reps"), [(1, 10), (5, 10)])
def test_two_percent_change_under_ten_percent_noise_is_never_regressed(rounds, reps):
    rng = np.random.default_rng(11)
    for seed in range(150):
        c = compare_sides(side(processes(rng, rounds, reps, 0.10)),
                          side(processes(rng, rounds, reps, 0.10, slowdown=1.02)), FAST)
        assert not c.regressed, (seed, [(r.metric, r.ratio, r.low, r.high) for r in c.regressed])


@pytest.mark.parametrize("wild_side", ["base", "head"])
def test_one_wild_block_gives_no_false_verdict(wild_side):
    # One process slowed 30x by a neighbour (as seen on this machine), the others normal.
    rng = np.random.default_rng(3)
    for seed in range(60):
        normal = processes(rng, 4, 5, 0.05)
        wild = processes(rng, 3, 5, 0.05) + processes(rng, 1, 5, 0.05, slowdown=30.0)
        base, head = (wild, normal) if wild_side == "base" else (normal, wild)
        c = compare_sides(side(base), side(head), FAST)
        assert not c.regressed and not [r for r in c.rows if r.verdict == "improved"], seed


def test_outlier_block_widens_the_interval_instead_of_moving_it():
    rng = np.random.default_rng(5)
    normal = [lognormal(rng, 5, 0.05, 10.0) for _ in range(4)]
    wild = normal[:3] + [lognormal(rng, 5, 0.05, 300.0)]
    ratio, low, high = gs.ratio_interval(normal, wild, 0.99, 1000, 0)
    assert low <= 1.05 and high > 2


def drifting_run(rng, cells: int, shift_sd: float, slowed: dict[str, float] | None = None) -> list[dict]:
    """A run of ``cells`` cells in 2 rounds of 10 repetitions (3% noise) on a machine whose speed moves between
    processes: each process's whole level is scaled by exp(N(0, shift_sd)), as a neighbour's load or clock
    changes do between two runs measured one after the other."""
    slowed = slowed or {}
    return [record(f"v{i}", timing_samples(rng, 10, 0.03, slowed.get(f"v{i}", 1.0) * math.exp(rng.normal(0, shift_sd))))
            for _ in range(2) for i in range(cells)]


@pytest.mark.slow
def test_two_runs_on_a_machine_that_drifts_between_processes_are_never_regressed(monkeypatch):
    # Identical code, run after run: 8 cells, 2 processes a side, 8% between processes, 3% within.
    rng = np.random.default_rng(21)
    pairs = [(side(drifting_run(rng, 8, 0.08)), side(drifting_run(rng, 8, 0.08))) for _ in range(40)]
    cfg = gs.GateConfig(n_resamples=500)
    called, estimates = 0, []
    for base, head in pairs:
        c = compare_sides(base, head, cfg)
        called += any(r.verdict in ("regressed", "improved") for r in c.rows)
        tpot = [r for r in c.rows if r.metric == "tpot_ms"]
        assert len({r.process_sd for r in tpot}) == 1  # one pooled figure for every cell of the metric
        estimates.append(tpot[0].process_sd)
    assert called <= 1  # the gate's false discovery rate is 1%: 100 such pairs gave 1 (a 14% change in 2 v 2)
    assert 0.06 < float(np.median(estimates)) < 0.10  # the pooled estimate finds the 8%
    # The same pairs judged without the between-process term: repetitions of one process are not independent
    # samples of the machine, and the pooled rank test calls changes that are whole processes moving.
    import bench.compare as compare

    monkeypatch.setattr(compare, "_process_noise", lambda base, head: {})
    assert sum(bool(compare_sides(b, h, cfg).regressed) for b, h in pairs) >= 20


def test_a_real_slowdown_still_stands_out_of_the_drift_between_processes():
    rng = np.random.default_rng(22)
    hits = others = 0
    for _ in range(20):
        c = compare_sides(side(drifting_run(rng, 8, 0.08)), side(drifting_run(rng, 8, 0.08, {"v3": 1.6})),
                          gs.GateConfig(n_resamples=500))
        hits += verdicts(c)["v3:tpot_ms"] == "regressed"
        others += any(r.verdict in ("regressed", "improved") and "v3" not in r.cell for r in c.rows)
        tpot = next(r for r in c.rows if r.metric == "tpot_ms" and "v3" in r.cell)
        assert 0.15 < tpot.mde < 0.45  # wider than the repetitions alone would say (about 4%), within 60%
    assert hits >= 17 and others <= 1  # 50 such pairs: 47 regressed, no other cell called


def test_process_variance_is_the_excess_over_the_repetitions_noise_and_robust_to_one_wild_cell():
    rng = np.random.default_rng(4)

    def cell_side(shift_sd, wild=1.0, k=3):
        return [lognormal(rng, 10, 0.05, (wild if j == 0 else 1.0) * math.exp(rng.normal(0, shift_sd)))
                for j in range(k)]

    steady = gs.process_noise([cell_side(0.0) for _ in range(30)])
    assert steady.var < 0.01 ** 2 and steady.df == 60  # processes agreeing as their repetitions predict: ~nothing
    drifting = gs.process_noise([cell_side(0.10) for _ in range(30)])
    assert 0.07 ** 2 < drifting.var < 0.14 ** 2
    one_wild = gs.process_noise([cell_side(0.0, wild=30.0)] + [cell_side(0.0) for _ in range(29)])
    assert one_wild.var < 0.01 ** 2 and one_wild.df == 58  # one process slowed 30x does not set it for every cell
    assert gs.process_noise([[lognormal(rng, 10, 0.05)] for _ in range(5)]) is None  # one process a cell
    assert gs.mde(0.03, 20, 20) < gs.mde(0.03, 20, 20, process_var=0.05 ** 2, blocks=(2, 2))


def test_verdict_rules():
    assert gs.verdict(1.08, 1.20, True, 0.05, "lower") == "regressed"
    assert gs.verdict(1.08, 1.20, False, 0.05, "lower") == "inconclusive"  # beyond, but not significant
    assert gs.verdict(1.08, 1.20, True, 0.05, "higher") == "improved"  # more tokens/s
    assert gs.verdict(0.80, 0.90, True, 0.05, "higher") == "regressed"
    assert gs.verdict(0.97, 1.03, False, 0.05, "lower") == "unchanged"
    assert gs.verdict(1.01, 1.09, True, 0.05, "lower") == "inconclusive"  # straddles the threshold


def test_mde_follows_noise_and_sample_count():
    assert gs.mde(0.10, 40, 40) < gs.mde(0.10, 10, 10) < gs.mde(0.20, 10, 10)
    assert math.isinf(gs.mde(0.10, 2, 2))  # a rank test on 2 + 2 samples can never reach q = 0.01
    assert gs.min_rank_p(5, 5) == pytest.approx(2 / 252)


def test_bh_adjust_is_monotone_and_bounded():
    q = gs.bh_adjust([0.001, 0.01, 0.02, 0.5])
    assert q == sorted(q) and all(0 <= x <= 1 for x in q) and q[0] == pytest.approx(0.004)


def test_memory_with_one_process_per_side_uses_the_range():
    base = side([record("fp32", {"tpot_ms": [3.0, 3.1, 3.0, 2.9, 3.0]}, peak_memory=4.00e8)])
    head = side([record("fp32", {"tpot_ms": [3.0, 3.1, 3.0, 2.9, 3.0]}, peak_memory=4.40e8)])
    mem = next(r for r in compare_sides(base, head, FAST).rows if r.metric == "peak_memory_bytes")
    assert mem.verdict == "regressed" and mem.q is None and mem.ratio == pytest.approx(1.1)


# --- the command: exit codes, environment check, output ---------------------------------------------------


def _runs(tmp_path: Path, slowdown: float = 1.0, head_env: dict | None = None, **kw):
    rng = np.random.default_rng(0)
    base = synthetic_run(tmp_path / "base", rng, cells=3, cv=0.02, reps=10, rounds=2)
    head = synthetic_run(tmp_path / "head", rng, cells=3, cv=0.02, reps=10, rounds=2, slowdown={"v1": slowdown},
                         env=head_env, **kw)
    return str(base), str(head)


def test_exit_zero_on_aa_with_markdown_and_json(tmp_path, capsys):
    base, head = _runs(tmp_path)
    assert cli(["compare", base, head, "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "s.md")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["exit_code"] == 0 and data["counts"]["regressed"] == 0 and len(data["rows"]) == 3 * 5
    assert (tmp_path / "s.md").read_text().startswith("## infermatrix regression gate")
    assert "Result: pass" in capsys.readouterr().out


def test_exit_one_names_the_regressed_cell(tmp_path, capsys):
    base, head = _runs(tmp_path, slowdown=1.3)
    assert cli(["compare", base, head]) == 1
    out, err = capsys.readouterr()
    assert "regressed: synthetic:llama-tiny v1 cpu generate 1/16/8: TPOT ms +30" in err
    assert "v0" not in err and "v2" not in err and "Result: FAIL" in out


def test_environment_mismatch_is_stated_first_and_withholds_the_regression(tmp_path, capsys):
    base, head = _runs(tmp_path, slowdown=1.3, head_env={**ENV, "cpu_model": "Other CPU"})
    assert cli(["compare", base, head]) == 0
    out = capsys.readouterr().out
    first = out.split("\n\n")[1]
    assert first.startswith("**Environments differ") and "cpu_model: 'Test CPU' in base, 'Other CPU' in head" in out
    assert "withheld: environments differ" in out
    assert cli(["compare", base, head, "--allow-env-mismatch"]) == 1


def test_unmatched_cells_are_bad_input_and_listed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = synthetic_run(tmp_path / "base", rng, cells=2)
    head = synthetic_run(tmp_path / "head", rng, cells=3)
    assert cli(["compare", str(base), str(head)]) == 2
    err = capsys.readouterr().err
    assert "1 cells are in only one run" in err and "synthetic:llama-tiny v2 cpu generate 1/16/8 (only in head)" in err
    assert cli(["compare", str(base), str(head), "--allow-unmatched"]) == 0
    assert "(only in head)" in capsys.readouterr().out


def test_missing_samples_are_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = write_run(tmp_path / "base", [record("fp32", timing_samples(rng, 5, 0.02))])
    head_samples = timing_samples(rng, 5, 0.02)
    del head_samples["tpot_ms"]
    head = write_run(tmp_path / "head", [record("fp32", head_samples)])
    assert cli(["compare", str(base), str(head)]) == 2
    assert "metric tpot_ms has no samples in head" in capsys.readouterr().err
    assert cli(["compare", str(base), str(tmp_path / "nowhere")]) == 2


def test_cell_failing_in_head_is_a_regression(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = write_run(tmp_path / "base", [record("fp32", timing_samples(rng, 5, 0.02))])
    head = write_run(tmp_path / "head", [record("fp32", {}, status="failed")])
    assert cli(["compare", str(base), str(head)]) == 1
    captured = capsys.readouterr()
    assert "ok in base, failed in head" in captured.out
    # No change figure for a cell that did not run (it once read "+0.0%").
    assert captured.err == "regressed: synthetic:llama-tiny fp32 cpu generate 1/16/8: status ok in base, failed in " \
                           "head: boom\n"


def test_shards_from_differing_cpus_merge_when_allowed_and_compare_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = write_run(tmp_path / "a", [record("fp32", timing_samples(rng, 5, 0.02))])
    b = write_run(tmp_path / "b", [record("bf16", timing_samples(rng, 5, 0.02))], env={**ENV, "cpu_model": "Other"})
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m0")]) == 2
    assert "incompatible environment: cpu_model" in capsys.readouterr().err
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--allow-env-mismatch"]) == 0
    merged = json.loads((tmp_path / "m" / "run.json").read_text())
    assert "cpu_model is 'Other'" in merged["environment_differences"][0]
    capsys.readouterr()
    assert cli(["compare", str(tmp_path / "m"), str(tmp_path / "m")]) == 0
    assert "base mixes environments (merged shards or a resume elsewhere)" in capsys.readouterr().out


def test_a_regression_measured_under_heavier_load_is_withheld(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def run(path, slowdown, busy):
        recs = [record("fp32", timing_samples(rng, 10, 0.02, slowdown)) for _ in range(2)]
        for r in recs:
            r["load"] = {"other_cpu_fraction": busy}
        return str(write_run(path, recs))

    base = run(tmp_path / "base", 1.0, 0.05)
    assert cli(["compare", base, run(tmp_path / "quiet", 1.3, 0.10)]) == 1  # similar load: the regression stands
    capsys.readouterr()
    assert cli(["compare", base, run(tmp_path / "busy", 1.3, 0.60)]) == 0
    out = capsys.readouterr().out
    assert "regressed withheld: the head side ran while other processes used 60% of the CPUs (5%" in out
    assert "Machine load while measuring" in out


def test_one_process_per_side_gives_no_speed_verdict_by_default(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = synthetic_run(tmp_path / "base", rng, cells=1, cv=0.02, reps=20)
    head = synthetic_run(tmp_path / "head", rng, cells=1, cv=0.02, reps=20, slowdown={"v0": 1.3})
    assert cli(["compare", str(base), str(head)]) == 0
    out = capsys.readouterr().out
    assert "regressed withheld: 1 process(es) on a side, 2 needed" in out
    assert cli(["compare", str(base), str(head), "--min-processes", "1"]) == 1


def test_gated_metrics_come_from_the_catalogue_with_a_direction():
    from bench.catalogue import metric
    from bench.compare import gated_metrics

    gated = gated_metrics()
    assert {m.kind for m in gated} == {"speed", "memory"}
    for m in gated:
        assert m.direction in ("lower", "higher") and m.direction == metric(m.key).direction
    assert {m.key: m.direction for m in gated}["decode_tokens_per_s"] == "higher"


def test_a_run_compared_with_itself_or_its_copy_says_nothing_can_regress(tmp_path, capsys):
    """A gate given one run twice (a path variable set wrong) passed every commit without a word."""
    base, head = _runs(tmp_path)
    assert cli(["compare", base, head]) == 0
    out, err = capsys.readouterr()
    assert "one run" not in out + err  # two runs: no note
    shutil.copytree(base, tmp_path / "copy")
    for other, why in ((base, "one directory"),
                       (str(tmp_path / "copy"), "copies of one run (the same start, host, matrix and revision)")):
        assert cli(["compare", base, other, "--json", str(tmp_path / "c.json")]) == 0
        out, err = capsys.readouterr()
        assert out.split("\n\n")[1] == (f"**BASE and HEAD are one run** ({why}): every figure is compared with "
                                         "itself, so nothing can regress; check the paths the gate was given.")
        assert err == f"warning: BASE and HEAD are one run ({why}): nothing can regress\n"
        assert json.loads((tmp_path / "c.json").read_text())["same_run"] == why
