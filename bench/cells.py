"""The typed cell: one measurement of a matrix (model x variant x device x scenario).

``expand`` makes cells from a validated matrix; a cell crosses into its process through
``to_dict`` / ``from_dict`` and nothing in between re-validates it. ``identity`` is what
two runs' records are matched on (``compare``, ``ab``); ``Cell.cell_id`` is the content
hash that results, resume and shards key on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.metrics.drift_config import DriftBudget, DriftConfig
from bench.metrics.timing import RepeatConfig
from bench.scenarios import Scenario, scenario_from_dict
from optimize.recipe import Recipe
from optimize.registry import recipe_from_dict

_GRID_KEYS = ("batch_size", "prompt_tokens", "new_tokens")


@dataclass(frozen=True)
class MeasureConfig:
    """How each cell is measured; the defaults every entry point shares."""

    repeat: RepeatConfig = RepeatConfig()
    timeout_s: float = 600.0  # per cell, process killed past it
    seed: int = 0
    roofline: bool = True  # measure bandwidth and matmul ceilings at the start of the run
    # Every cell runs this many times, each in a fresh process, the cell order shuffled per round
    # (random interleaving): a burst of load then lands on all variants rather than on one.
    rounds: int = 1
    # torch's intra-op threads in each cell (llama-bench's -t); 0 keeps torch's default (the cores it sees).
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.repeat), "timeout_s": self.timeout_s, "seed": self.seed,
                "roofline": self.roofline, "rounds": self.rounds, "threads": self.threads}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasureConfig:
        """The settings ``to_dict`` wrote (already validated when the matrix was read)."""
        repeat = RepeatConfig(**{f.name: data[f.name] for f in dataclasses.fields(RepeatConfig) if f.name in data})
        own = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "repeat" and f.name in data}
        return cls(repeat=repeat, **own)


def identity(model: str, variant: str, device: str, scenario: dict[str, Any]) -> str:
    """The readable key two runs' cells are matched on: model, variant name, device, scenario.

    The recipe's steps are left out, so a variant whose recipe changed between revisions is
    still the same cell to ``compare``.
    """
    grid = "/".join(str(scenario[k]) for k in _GRID_KEYS if k in scenario)
    extra = ",".join(f"{k}={v}" for k, v in sorted(scenario.items()) if k not in ("name", *_GRID_KEYS))
    return f"{model} {variant} {device} {scenario.get('name', 'generate')} {grid}" + (f" {extra}" if extra else "")


@dataclass(frozen=True)
class Cell:
    model: str
    recipe: Recipe
    device: str  # resolved: cpu or cuda
    scenario: Scenario
    measure: MeasureConfig = MeasureConfig()
    drift: DriftConfig | None = None  # None: drift is not measured
    drift_budget: DriftBudget = DriftBudget()
    trust_remote_code: bool = False
    eval_text: str | None = None
    tokenizer: str | None = None
    prompt_source: str = "auto"
    # Set by the run that executes the cell; not part of what the cell is.
    cache_dir: str | None = None
    ceilings: dict[str, Any] | None = None
    round: int | None = None

    @functools.cached_property
    def cell_id(self) -> str:
        payload = {"model": self.model, "recipe": self.recipe.to_dict(), "device": self.device,
                   "scenario": self.scenario.to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def cache_path(self) -> Path | None:
        """The run's cache directory, or None for the default one."""
        return Path(self.cache_dir) if self.cache_dir else None

    @property
    def key(self) -> str:
        return identity(self.model, self.recipe.name, self.device, self.scenario.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The job file a cell's process reads; JSON-ready."""
        out = {"cell_id": self.cell_id, "model": self.model, "variant": self.recipe.to_dict(), "device": self.device,
               "scenario": self.scenario.to_dict(), "measure": self.measure.to_dict(),
               "drift": dataclasses.asdict(self.drift) if self.drift else None,
               "drift_budget": dataclasses.asdict(self.drift_budget), "trust_remote_code": self.trust_remote_code,
               "eval_text": self.eval_text, "tokenizer": self.tokenizer, "prompt_source": self.prompt_source,
               "cache_dir": self.cache_dir, "ceilings": self.ceilings}
        if self.round is not None:
            out["round"] = self.round
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """The cell ``to_dict`` wrote; a ``cell_id`` that does not match its contents is refused."""
        cell = cls(model=data["model"], recipe=recipe_from_dict(data["variant"]), device=data["device"],
                   scenario=scenario_from_dict(data["scenario"]), measure=MeasureConfig.from_dict(data["measure"]),
                   drift=DriftConfig(**data["drift"]) if data.get("drift") else None,
                   drift_budget=DriftBudget(**(data.get("drift_budget") or {})),
                   trust_remote_code=data.get("trust_remote_code", False), eval_text=data.get("eval_text"),
                   tokenizer=data.get("tokenizer"), prompt_source=data.get("prompt_source", "auto"),
                   cache_dir=data.get("cache_dir"), ceilings=data.get("ceilings"), round=data.get("round"))
        if "cell_id" in data and data["cell_id"] != cell.cell_id:
            raise ValueError(f"cell {data['cell_id']}: its contents hash to {cell.cell_id}; the job file was altered")
        return cell
