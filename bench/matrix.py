"""Matrix files: parse and validate TOML, expand cells, narrow with CLI flags, shard.

A matrix is models x variants x devices x scenario grids, minus explicit exclusions.
Every error names the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from bench.cells import Cell, MeasureConfig
from bench.metrics.drift_config import DriftBudget, DriftConfig
from bench.metrics.timing import MAX_COUNT, RepeatConfig
from bench.scenarios import SCENARIOS
from optimize.errors import InputError, RecipeError
from optimize.models import check_model_spec
from optimize.recipe import Recipe
from optimize.registry import did_you_mean, first_repeat, recipe_from_dict

DEFAULT_MATRIX = Path(__file__).parent / "matrices" / "default.toml"
TOP_KEYS = {"name", "description", "models", "variants", "devices", "scenarios", "measure", "drift", "recipe",
            "exclude", "trust_remote_code", "eval_text", "tokenizer", "prompt_source"}
DEVICES = ("auto", "cpu", "cuda")
# A cell's longest timeout: the runner waits on its process with poll(), which takes at most 2**31 - 1 ms.
MAX_TIMEOUT_S = 2_147_483
TIMEOUT_ALLOWED = f"must be a finite number of seconds > 0 and at most {MAX_TIMEOUT_S} (24 days: the longest wait " \
                  "the runner's poll takes)"
# A run name becomes a directory under reports/runs/: no separators, no leading dot.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


@dataclass(frozen=True)
class Matrix:
    name: str
    models: tuple[str, ...]
    variants: tuple[str, ...]
    devices: tuple[str, ...]
    scenarios: tuple[dict[str, Any], ...]  # each a grid: {"name": kind, setting: [values]}, every point valid
    measure: MeasureConfig = MeasureConfig()
    drift: DriftConfig = DriftConfig()
    drift_budget: DriftBudget = DriftBudget()
    description: str = ""
    recipes: dict[str, Recipe] = field(default_factory=dict)  # inline variants by name
    exclude: tuple[dict[str, Any], ...] = ()
    trust_remote_code: bool = False
    eval_text: str | None = None
    tokenizer: str | None = None  # tokenizer directory for models saved without one
    prompt_source: str = "auto"  # auto | eval-text | random (bench.prompts)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "models": list(self.models), "variants": list(self.variants),
            "devices": list(self.devices), "scenarios": [dict(s) for s in self.scenarios],
            "measure": self.measure.to_dict(),
            "drift": {**_drift_dict(self.drift), "budget": {k: v for k, v in dataclasses.asdict(
                self.drift_budget).items() if v is not None}},
            "description": self.description, "recipe": [r.to_dict() for r in self.recipes.values()],
            "exclude": [dict(e) for e in self.exclude], "trust_remote_code": self.trust_remote_code,
            "eval_text": self.eval_text, "tokenizer": self.tokenizer, "prompt_source": self.prompt_source,
            "source": self.source,
        }

    def recipe(self, name: str) -> Recipe:
        from optimize.registry import builtin_variant

        return self.recipes[name] if name in self.recipes else builtin_variant(name)


def _err(where: str, key: str, msg: str) -> InputError:
    return InputError(f"{where}: '{key}' {msg}")


def _timeout_ok(value: Any) -> bool:
    return _number(value) and 0 < value <= MAX_TIMEOUT_S


def _bool(data: dict, key: str, where: str, default: bool) -> bool:
    """A TOML boolean; a string such as "false" is an error, never truthy."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _err(where, key, f"must be true or false (a TOML boolean, unquoted), got {value!r}")
    return value


def _text(data: dict, key: str, where: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _err(where, key, f"must be a string, got {value!r}")
    return value


def _run_name(data: dict, where: str) -> str:
    """The matrix name, which names the run directory: it must not leave the runs folder."""
    if "name" not in data:
        stem = re.sub(r"[^A-Za-z0-9._+-]", "-", Path(where).stem).lstrip(".-_+")
        return stem[:100] or "matrix"
    name = _text(data, "name", where, "")
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise _err(where, "name", f"must be 1-100 letters, digits, '.', '_', '+' or '-', starting with a letter or "
                                  f"digit, without '..' (it names the run directory), got {name!r}")
    return name


def _eval_text(data: dict, where: str) -> str | None:
    """A user evaluation text must be an existing file: a missing one never falls back to random prompts.

    A relative path is taken from the working directory, as a model directory's or ``tokenizer``'s
    is (the cells read it from there); the error names the path that was tried.
    """
    from optimize.models import eval_text_path

    if "eval_text" not in data:
        return None
    value = _text(data, "eval_text", where, "")
    if not value or not Path(value).is_file():
        raise _err(where, "eval_text", f"must name an existing text file: {_missing_path(value, where)}")
    try:
        raw = eval_text_path(value).read_bytes()
    except InputError as exc:
        raise _err(where, "eval_text", f"must name an existing text file: {exc}") from None
    except OSError as exc:
        raise _err(where, "eval_text", f"{value!r} cannot be read: {exc.strerror or exc}") from None
    text = _utf8(raw, f"{where}: 'eval_text' {value!r}")
    if not text.strip():
        raise _err(where, "eval_text", f"{value!r} holds no text") from None
    return value


def _missing_path(value: str, where: str) -> str:
    """Why ``value``, a path a matrix file gives, names no file: the absolute path tried and, for a relative
    one that is beside the matrix file, the path to give instead.
    """
    if not value:
        return "got an empty path"
    path = Path(value)
    if path.is_absolute():
        return f"{value!r} is not a file"
    tried = Path.cwd() / path
    text = f"{value!r} is not a file (a relative path is taken from the working directory: tried {tried})"
    beside = Path(where).parent / path
    if beside.is_file():
        text += f"; the matrix file's folder has one: give {os.path.relpath(beside)!r} or an absolute path"
    return text


def _utf8(raw: bytes, what: str) -> str:
    """``raw`` decoded as UTF-8; else an ``InputError`` naming ``what``, the first bad byte and its offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                         f"({exc.reason})") from None


def _tokenizer(data: dict, where: str) -> str | None:
    """The ``tokenizer`` key, checked as ``--tokenizer`` is: a missing one would fail every cell."""
    from optimize.models import has_tokenizer_files

    value = _text(data, "tokenizer", where, "")
    if value and not has_tokenizer_files(Path(value).expanduser()):
        raise _err(where, "tokenizer", f"{value!r} is not a directory with tokenizer.json or tokenizer_config.json")
    return value or None


def _number(value: Any) -> bool:
    """An int or float that is finite: booleans, NaN and infinities are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_list(data: dict, key: str, where: str, default=None) -> tuple[str, ...]:
    value = data.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v and "\0" not in v
                                                           for v in value):
        raise _err(where, key, f"must be a non-empty list of strings, got {value!r}")
    return tuple(_distinct(value, where, key))


def _distinct(values: list, where: str, key: str) -> list:
    """A list naming something twice is a typo (two lines copied, one not edited), refused: its cells were
    measured once and the list read as if they had been measured twice.
    """
    twice = first_repeat(values)
    if twice is not None:
        raise _err(where, key, f"lists {twice!r} twice; each value may appear once, got {values!r}")
    return values


def _int_list(value: Any, where: str, key: str) -> list[int]:
    """An integer or a non-empty list of integers (their ranges are the scenario's to check)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise _err(where, key, f"must be an integer or a non-empty list of integers, got {value!r}")
    return _distinct(value, where, key)


def _parse_scenarios(raw: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or not raw:
        raise _err(where, "scenarios", "must be a non-empty array of tables ([[scenarios]])")
    out = []
    for i, table in enumerate(raw):
        if not isinstance(table, dict):
            raise _err(f"{where} scenarios[{i}]", "scenarios", f"must be a table ([[scenarios]]), got {table!r}")
        kind = table.get("name", "generate")
        if not isinstance(kind, str) or kind not in SCENARIOS:
            raise _err(f"{where} scenarios[{i}]", "name", f"must be one of {sorted(SCENARIOS)}, got {kind!r}")
        fields = SCENARIOS[kind].settings()
        unknown = sorted(set(table) - set(fields) - {"name"})
        if unknown:
            raise _err(f"{where} scenarios[{i}]", unknown[0],
                       f"is not a {kind} setting{did_you_mean(unknown[0], fields)}; allowed: {fields}")
        out.append(_grid(kind, {k: table.get(k, getattr(SCENARIOS[kind](), k)) for k in fields},
                         f"{where} scenarios[{i}]"))
    return tuple(out)


def _grid(kind: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """A scenario grid whose every point is a valid scenario: the one place a grid value is checked."""
    grid = {"name": kind, **{k: _int_list(v, where, k) for k, v in values.items()}}
    keys = SCENARIOS[kind].settings()
    try:
        for point in itertools.product(*(grid[k] for k in keys)):
            SCENARIOS[kind](**dict(zip(keys, point, strict=True))).validate()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return grid


def _parse_measure(raw: Any, where: str) -> MeasureConfig:
    if not isinstance(raw, dict):
        raise _err(where, "measure", f"must be a table, got {raw!r}")
    repeat_fields = {f.name for f in dataclasses.fields(RepeatConfig)}
    allowed = repeat_fields | {"timeout_s", "seed", "roofline", "rounds", "threads"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(f"{where} [measure]", unknown[0],
                   f"is not a measure setting{did_you_mean(unknown[0], sorted(allowed))}; allowed: {sorted(allowed)}")
    roofline = raw.get("roofline", True)
    if not isinstance(roofline, bool):
        raise _err(f"{where} [measure]", "roofline", f"must be true or false, got {roofline!r}")
    base = MeasureConfig()
    for key, value in raw.items():
        if key in ("roofline", "rounds", "timeout_s") or key in repeat_fields:
            continue  # checked below, each with its own range
        if not _number(value) or value < 0:
            raise _err(f"{where} [measure]", key, f"must be a finite non-negative number, got {value!r}")
        if isinstance(getattr(base, key), int) and not isinstance(value, int):
            raise _err(f"{where} [measure]", key, f"must be an integer, got {value!r}")
    if "timeout_s" in raw and not _timeout_ok(raw["timeout_s"]):
        raise _err(f"{where} [measure]", "timeout_s", f"{TIMEOUT_ALLOWED}, got {raw['timeout_s']!r}")
    rounds = raw.get("rounds", base.rounds)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise _err(f"{where} [measure]", "rounds", f"must be a whole number >= 1, got {rounds!r}")
    for key in ("rounds", "seed", "threads"):
        if raw.get(key, 0) > MAX_COUNT:
            raise _err(f"{where} [measure]", key, f"must be at most {MAX_COUNT}, got {raw[key]}")
    repeat = dataclasses.replace(base.repeat, **{k: v for k, v in raw.items() if k in repeat_fields})
    try:
        repeat.validate({k: f"'{k}'" for k in repeat_fields})
    except InputError as exc:
        raise InputError(f"{where} [measure]: {exc}") from None
    repeat = dataclasses.replace(repeat, budget_s=float(repeat.budget_s), target_rel_ci=float(repeat.target_rel_ci))
    return MeasureConfig(repeat=repeat, timeout_s=float(raw.get("timeout_s", base.timeout_s)),
                         seed=int(raw.get("seed", base.seed)), roofline=roofline, rounds=rounds,
                         threads=raw.get("threads", base.threads))


def _parse_recipes(raw: Any, where: str, builtins: set[str]) -> dict[str, Recipe]:
    """Inline ``[[recipe]]`` tables; a name may appear once and may not shadow a built-in variant."""
    if not isinstance(raw, list):
        raise _err(where, "recipe", f"must be an array of tables ([[recipe]]), got {raw!r}")
    recipes: dict[str, Recipe] = {}
    for i, table in enumerate(raw):
        try:
            recipe = recipe_from_dict(table, f"{where} recipe[{i}]")
        except RecipeError as exc:
            raise InputError(str(exc)) from None
        if recipe.name in builtins:
            raise _err(f"{where} recipe[{i}]", "name", f"{recipe.name!r} is a built-in variant; give the recipe "
                                                       "another name")
        if recipe.name in recipes:
            raise _err(f"{where} recipe[{i}]", "name", f"{recipe.name!r} is used by two recipes; names must be "
                                                       "unique")
        recipes[recipe.name] = recipe
    return recipes


def exclude_keys() -> set[str]:
    """What an ``[[exclude]]`` rule may match: the cell's model, variant, device and scenario fields."""
    keys = {"model", "variant", "device", "name"}
    for kind in SCENARIOS.values():
        keys |= {*kind.settings(), *kind.FIXED}
    return keys


def _parse_exclude(raw: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or not all(isinstance(e, dict) and e for e in raw):
        raise _err(where, "exclude", "must be an array of non-empty tables ([[exclude]])")
    allowed = exclude_keys()
    for i, rule in enumerate(raw):
        for key in sorted(rule):
            if key not in allowed:
                raise _err(f"{where} exclude[{i}]", key, f"is not something a cell has{did_you_mean(key, allowed)}; "
                                                         f"allowed: {', '.join(sorted(allowed))}")
            text = key in ("model", "variant", "device", "name")  # the scenario's sizes are integers
            value = rule[key]
            if not (isinstance(value, str) if text else isinstance(value, int) and not isinstance(value, bool)):
                raise _err(f"{where} exclude[{i}]", key, f"must be {'a string' if text else 'an integer'}, got "
                                                         f"{value!r}: it would match no cell")
    return tuple(raw)


_WHAT = {"name": "scenario kind"}


def _check_exclude_names(rules: tuple[dict[str, Any], ...], names: dict[str, tuple[str, ...]], where: str) -> None:
    """A rule naming a model, variant, device or scenario kind the matrix does not have would match no cell:
    a typo (``bf61``), refused with the names it has (a device may be cpu or cuda where the matrix says auto).
    """
    for i, rule in enumerate(rules):
        for key, have in names.items():
            known = (*have, *DEVICES) if key == "device" else have
            if key in rule and rule[key] not in known:
                raise _err(f"{where} exclude[{i}]", key,
                           f"= {rule[key]!r} names no {_WHAT.get(key, key)} of this matrix, so it would match no "
                           f"cell{did_you_mean(rule[key], known)}; the matrix has: {', '.join(sorted(set(have)))}")


def _check_variants(variants: tuple[str, ...], recipes: dict[str, Recipe], where: str) -> tuple[str, ...]:
    from optimize.registry import variant_names

    known = set(variant_names()) | set(recipes)
    for name in variants:
        if name not in known:
            raise _err(where, "variants", f"names unknown variant {name!r}{did_you_mean(name, known)}; "
                                          "see 'infermatrix variants' or add a [[recipe]]")
    return variants


def _check_devices(devices: tuple[str, ...], where: str) -> tuple[str, ...]:
    for d in devices:
        if d not in DEVICES:
            raise _err(where, "devices", f"must be among {list(DEVICES)}, got {d!r}")
    return devices


def _check_models(models: tuple[str, ...], where: str) -> tuple[str, ...]:
    for spec in models:
        try:
            check_model_spec(spec)
        except InputError as exc:
            raise _err(where, "models", str(exc)) from None
    return models


def parse_matrix(data: dict[str, Any], where: str) -> Matrix:
    """Validate a matrix given as parsed TOML."""
    from optimize.registry import variant_names

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _err(where, unknown[0], f"is not a matrix key{did_you_mean(unknown[0], TOP_KEYS)}; "
                                      f"allowed: {', '.join(sorted(TOP_KEYS))}")
    recipes = _parse_recipes(data.get("recipe", []), where, set(variant_names()))
    variants = _check_variants(_str_list(data, "variants", where, ["fp32"]), recipes, where)
    devices = _check_devices(_str_list(data, "devices", where, ["auto"]), where)
    models = _check_models(_str_list(data, "models", where, ["builtin:pycode"]), where)
    scenarios = _parse_scenarios(data.get("scenarios", [{"name": "generate"}]), where)
    exclude = _parse_exclude(data.get("exclude", []), where)
    _check_exclude_names(exclude, {"model": models, "variant": variants, "device": devices,
                                   "name": tuple(sc["name"] for sc in scenarios)}, where)
    drift_table = dict(data.get("drift", {})) if isinstance(data.get("drift", {}), dict) else data["drift"]
    budget = drift_table.pop("budget", {}) if isinstance(drift_table, dict) else {}
    return Matrix(
        name=_run_name(data, where),
        description=_text(data, "description", where, ""),
        drift=DriftConfig.from_dict(drift_table, f"{where} [drift]"),
        drift_budget=DriftBudget.from_dict(budget, f"{where} [drift.budget]"),
        models=models,
        variants=variants,
        devices=devices,
        scenarios=scenarios,
        measure=_parse_measure(data.get("measure", {}), where),
        recipes=recipes,
        exclude=tuple(exclude),
        trust_remote_code=_bool(data, "trust_remote_code", where, False),
        eval_text=_eval_text(data, where),
        tokenizer=_tokenizer(data, where),
        prompt_source=_prompt_source(data.get("prompt_source", "auto"), where),
        source=where,
    )


def _prompt_source(value, where: str) -> str:
    from bench.prompts import PROMPT_SOURCES

    if value not in PROMPT_SOURCES:
        raise InputError(f"{where}: prompt_source must be one of {', '.join(PROMPT_SOURCES)}, got {value!r}")
    return value


def load_matrix(path: str | Path | None = None) -> Matrix:
    """Read a matrix file; the built-in default when ``path`` is None."""
    path = Path(path) if path else DEFAULT_MATRIX
    what = f"matrix file {str(path)!r}"
    if path.is_dir():
        raise InputError(f"{what} is a directory, not a TOML file")
    if not path.is_file():
        raise InputError(f"{what} does not exist" if not path.exists() else f"{what} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(_utf8(raw, what))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise InputError(f"{path}: arrays or inline tables nested too deeply to read") from None
    return parse_matrix(data, str(path))


def narrow(matrix: Matrix, *, models=None, variants=None, devices=None, batch_size=None, prompt_tokens=None,
           new_tokens=None, repeat: dict | None = None, timeout_s=None, threads: int | None = None,
           trust_remote_code=None,
           drift: bool | None = None, drift_protocol: str | None = None, tokenizer: str | None = None,
           prompt_source: str | None = None) -> Matrix:
    """Override parts of a matrix from CLI flags (comma lists replace the file's lists).

    Each part a flag replaces is checked here, once, with the same rules as the file's; the
    rest of the matrix was checked when it was read and is not parsed again.
    """
    where = f"{matrix.source} (with the command-line flags)"
    changes: dict[str, Any] = {}
    if models:
        changes["models"] = _check_models(tuple(models), where)
    if variants:
        changes["variants"] = _check_variants(tuple(variants), matrix.recipes, where)
    if devices:
        changes["devices"] = _check_devices(tuple(devices), where)
    grid = {k: v for k, v in (("batch_size", batch_size), ("prompt_tokens", prompt_tokens),
                              ("new_tokens", new_tokens)) if v}
    if grid:
        changes["scenarios"] = tuple(
            _grid(s["name"], {k: grid.get(k, v) for k, v in s.items() if k != "name"}, f"{where} scenarios[{i}]")
            for i, s in enumerate(matrix.scenarios))
    if repeat or timeout_s is not None or threads is not None:
        rep = dataclasses.replace(matrix.measure.repeat, **(repeat or {}))
        rep.validate({k: f"--{k.replace('_', '-')}" for k in repeat or {}})  # the flags given, by name
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise InputError(f"threads must be a whole number >= 0 (0: torch's default), got {threads!r}")
        if timeout_s is not None and not _timeout_ok(timeout_s):
            raise InputError(f"timeout_s {TIMEOUT_ALLOWED}, got {timeout_s!r}")
        changes["measure"] = dataclasses.replace(
            matrix.measure, repeat=rep, timeout_s=matrix.measure.timeout_s if timeout_s is None else float(timeout_s),
            threads=matrix.measure.threads if threads is None else threads)
    if trust_remote_code:
        changes["trust_remote_code"] = True
    if drift is not None or drift_protocol is not None:
        cfg = dataclasses.replace(matrix.drift, **({} if drift is None else {"enabled": bool(drift)}),
                                  **({} if drift_protocol is None else {"protocol": drift_protocol}))
        try:
            cfg.validate()
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        changes["drift"] = cfg
    if tokenizer:
        from optimize.models import check_tokenizer_dir

        changes["tokenizer"] = check_tokenizer_dir(tokenizer)
    if prompt_source:
        changes["prompt_source"] = _prompt_source(prompt_source, where)
    return dataclasses.replace(matrix, **changes)


def _excluded(cell: Cell, rules) -> bool:
    flat = {"model": cell.model, "variant": cell.recipe.name, "device": cell.device, **cell.scenario.to_dict()}
    return any(all(flat.get(k) == v for k, v in rule.items()) for rule in rules)


# Settings added after runs were recorded, left out of a matrix's description at their default value:
# the description (and its hash, which a run's cells are expanded against) of an older run stays its own.
LATER_DRIFT_DEFAULTS = {"random_weights": "score"}


def _drift_dict(drift: DriftConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(drift).items() if LATER_DRIFT_DEFAULTS.get(k, object()) != v}


def expand(matrix: Matrix, resolve_device=None) -> list[Cell]:
    """All cells of the matrix, in a stable order."""
    if resolve_device is None:
        from optimize.models import resolve_device
    cells, seen = [], set()
    devices = []
    for d in matrix.devices:
        r = resolve_device(d)
        if r not in devices:
            devices.append(r)
    shared = {"measure": matrix.measure, "drift": matrix.drift if matrix.drift.enabled else None,
              "drift_budget": matrix.drift_budget, "trust_remote_code": matrix.trust_remote_code,
              "eval_text": matrix.eval_text, "tokenizer": matrix.tokenizer, "prompt_source": matrix.prompt_source}
    for model, variant, device, grid in itertools.product(matrix.models, matrix.variants, devices, matrix.scenarios):
        recipe = matrix.recipe(variant)
        kind = SCENARIOS[grid["name"]]
        keys = kind.settings()
        for values in itertools.product(*(grid[k] for k in keys)):
            scenario = kind(**dict(zip(keys, values, strict=True)))
            cell = Cell(model=model, recipe=recipe, device=device, scenario=scenario, **shared)
            if cell.cell_id in seen:
                continue
            seen.add(cell.cell_id)
            if not _excluded(cell, matrix.exclude):
                cells.append(cell)
    return cells
