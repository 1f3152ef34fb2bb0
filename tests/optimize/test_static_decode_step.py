"""Static KV cache with a compiled one-token decode step (gpt-fast's split), on the CPU."""

from __future__ import annotations

import pytest
import torch

from bench.metrics.timing import RepeatConfig
from bench.scenarios.generate import GenerateScenario, greedy_generate
from optimize.kvcache import KVCache, decode_step_compile_config
from optimize.recipe import Recipe
from optimize.registry import builtin_variant
from optimize.store import VariantStore, load_variant

NEW = 8


@pytest.fixture(scope="module")
def prompts(tiny_ref):
    from bench.prompts import prompt_ids

    ids, _ = prompt_ids(tiny_ref, 8192, 2, 16)
    return ids


@pytest.fixture(scope="module")
def eager_tokens(tiny_ref, cache_dir, prompts):
    state, _ = load_variant(tiny_ref, builtin_variant("fp32"), "cpu", VariantStore(cache_dir))
    return greedy_generate(state, prompts, NEW)


def test_only_the_one_token_decode_step_is_compiled_as_one_graph(tiny_ref, cache_dir, prompts, eager_tokens):
    """A recording backend sees what transformers hands torch.compile: one graph, one-token inputs, no break."""
    from torch._dynamo.utils import counters

    seen: list[tuple[int, ...]] = []

    def recording_backend(gm, example_inputs):
        seen.extend(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.long
                    and t.dim() == 2)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    state, _ = load_variant(tiny_ref, Recipe(name="static-compiled", steps=(KVCache(mode="static", compile=True),)),
                            "cpu", VariantStore(cache_dir))
    config = state.decoder.compile_config
    assert config.fullgraph and config.dynamic is False
    config.backend = recording_backend
    tokens = greedy_generate(state, prompts, NEW)
    assert torch.equal(tokens, eager_tokens)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert seen and all(shape == (2, 1) for shape in seen), seen  # decode tokens only: the prefill (2, 16) ran eager
    greedy_generate(state, prompts, NEW)
    assert counters["stats"]["unique_graphs"] == 1  # same shapes against the static cache: no recompilation


@pytest.mark.slow
def test_inductor_compiled_decode_step_reproduces_eager_tokens_and_times_compile_apart(tiny_ref, cache_dir, prompts,
                                                                                        eager_tokens):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    state, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    assert any("decode step compiled" in label for label in state.labels)
    scenario = GenerateScenario(batch_size=2, prompt_tokens=16, new_tokens=NEW)
    metrics, samples, method = scenario.run(state, prompts, RepeatConfig(warmup=0, min_reps=2, max_reps=2, budget_s=0))
    compiled = method["compiled_decode_step"]
    assert method["decode_loop"].startswith("the variant's own greedy loop")  # what the record says was timed
    # One graph for the whole call sequence: the extra call before the repetitions compiled it, and
    # no measured repetition recompiled (wall times are not compared: a busy machine reorders them).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert compiled["compile_call_wall_s"] > 0
    assert compiled["compile_and_capture_s"] == pytest.approx(
        max(compiled["compile_call_wall_s"] - metrics["e2e_ms"]["p50"] / 1e3, 0.0))
    assert samples["warmup_wall_s"] == [] and len(samples["e2e_ms"]) == 2
    assert torch.equal(greedy_generate(state, prompts, NEW), eager_tokens)


@pytest.mark.slow
def test_a_decode_step_asking_for_cuda_graphs_records_whether_inductor_skipped_them(tiny_ref, cache_dir, prompts):
    """On the CPU inductor cannot graph the step and says so only in its counters: the record says it."""
    torch._dynamo.reset()
    recipe = Recipe(name="graphs", steps=(KVCache(mode="static", compile=True, compile_mode="reduce-overhead"),))
    state, _ = load_variant(tiny_ref, recipe, "cpu", VariantStore(cache_dir))
    scenario = GenerateScenario(batch_size=2, prompt_tokens=16, new_tokens=NEW)
    _, _, method = scenario.run(state, prompts, RepeatConfig(warmup=0, min_reps=2, max_reps=2, budget_s=0))
    assert method["compiled_decode_step"]["cudagraph_skips"] == 1  # one graph, compiled once, not graphed
    assert state.labels[-1] == ("CUDA graphs not used (1 compiled graph(s) skipped by inductor: the compiled graph "
                                "runs on the CPU)")
    eager = Recipe(name="default-mode", steps=(KVCache(mode="static", compile=True),))
    state, _ = load_variant(tiny_ref, eager, "cpu", VariantStore(cache_dir))
    _, _, method = scenario.run(state, prompts, RepeatConfig(warmup=0, min_reps=2, max_reps=2, budget_s=0))
    assert "cudagraph_skips" not in method["compiled_decode_step"]  # no CUDA graphs asked for: nothing to say
    assert not any("CUDA graphs" in label for label in state.labels)


def test_cudagraph_skips_are_collected_with_their_logged_reasons():
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_utils import cudagraphs_log, log_cudagraph_skip_and_bump_counter

    from bench.scenarios.generate import GraphSkips, _cudagraph_skips

    seen = GraphSkips()
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to an earlier graph")  # before: not counted
    with _cudagraph_skips(seen, "the compiled graph runs on the CPU"):
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
        counters["inductor"]["cudagraph_skips"] += 1  # a CPU graph: counted, not logged
        cudagraphs_log.warning("a dynamic shape may cost recompilations")  # logged, skips nothing
    assert seen.count == 2
    assert seen.reasons == ["skipping cudagraphs due to mutated inputs (1 instances)",
                            "a dynamic shape may cost recompilations"]
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs after the block")
    assert (seen.count, len(seen.reasons)) == (2, 2)  # the handler is gone
    silent = GraphSkips()
    with _cudagraph_skips(silent, "the compiled graph runs on the CPU"):
        counters["inductor"]["cudagraph_skips"] += 1
    assert (silent.count, silent.reasons) == (1, ["the compiled graph runs on the CPU"])


def test_static_cache_without_compile_stays_eager(tiny_ref, cache_dir):
    state, _ = load_variant(tiny_ref, Recipe(name="static", steps=(KVCache(mode="static"),)), "cpu",
                            VariantStore(cache_dir))
    assert state.generate_kwargs == {"cache_implementation": "static", "disable_compile": True}


def test_decode_step_config_uses_cuda_graphs_in_reduce_overhead_mode():
    config = decode_step_compile_config("reduce-overhead")
    assert config.mode == "reduce-overhead" and config.fullgraph and config._compile_all_devices
