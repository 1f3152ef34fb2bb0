"""Defaults live in the config dataclasses: the default matrix and a bare user matrix agree."""

from __future__ import annotations

from bench.matrix import DEFAULT_MATRIX, DriftConfig, MeasureConfig, load_matrix, parse_matrix, tomllib
from bench.metrics.timing import RepeatConfig


def test_user_matrix_without_measure_measures_like_the_default_run(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('models = ["builtin:pycode"]\nvariants = ["fp32"]\n')
    assert load_matrix(user).measure == load_matrix().measure  # `infermatrix run` with no argument
    assert load_matrix(user).drift == load_matrix().drift


def test_default_matrix_states_only_what_differs_from_the_dataclasses():
    data = tomllib.loads(DEFAULT_MATRIX.read_text())
    defaults = {**{k: getattr(RepeatConfig(), k) for k in RepeatConfig.__dataclass_fields__},
                **{k: getattr(MeasureConfig(), k) for k in ("timeout_s", "seed", "roofline", "rounds")}}
    for key, value in data.get("measure", {}).items():
        assert defaults[key] != value, f"default.toml [measure] {key} repeats the dataclass default"
    for key, value in data.get("drift", {}).items():
        assert getattr(DriftConfig(), key) != value, f"default.toml [drift] {key} repeats the dataclass default"


def test_default_run_keeps_its_measurement_settings():
    # The values `infermatrix run` used before the defaults moved into the dataclasses.
    m = load_matrix()
    assert (m.measure.repeat.warmup, m.measure.repeat.min_reps, m.measure.repeat.max_reps) == (1, 5, 20)
    assert m.measure.repeat.budget_s == 0.5 and m.measure.timeout_s == 600.0
    assert (m.drift.context, m.drift.max_tokens) == (256, 8192)


def test_bare_matrix_dict_takes_dataclass_defaults():
    m = parse_matrix({}, "<dict>")
    assert m.measure == MeasureConfig() and m.drift == DriftConfig()


def test_every_library_list_reads_the_one_table():
    from bench import compare, env, merge
    from bench.report import markdown
    from optimize import store
    from optimize.libraries import libraries

    assert env.LIBRARIES == libraries()
    assert store.KEY_LIBRARIES == libraries("artifact")
    assert merge.COMPATIBLE_LIBRARIES == libraries("compatible")
    assert compare.ENV_LIBRARIES == libraries("compare")
    assert markdown.LIBRARIES == libraries("report")
    for role in ("artifact", "reference", "drift", "compatible", "compare", "report"):
        assert set(libraries(role)) <= set(libraries()) and libraries(role)
