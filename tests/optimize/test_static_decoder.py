"""The static-cache decode loop (optimize.decode): generate()'s greedy tokens, without its per-token host work."""

from __future__ import annotations

import pytest
import torch

from bench.generation import decode_loop, greedy_generate
from bench.prompts import prompt_ids
from optimize.decode import StaticDecoder
from optimize.kvcache import KVCache
from optimize.recipe import Recipe
from optimize.registry import builtin_variant
from optimize.store import VariantStore, load_variant
from tests.optimize.helpers import synthetic_fp32

NEW = 6
FAMILIES = ("llama-tiny", "llama-tied-tiny", "gpt2-tiny", "opt-tiny", "gpt-neox-tiny", "qwen2-tiny", "mistral-tiny",
            "phi-tiny")
# What a Python caller does to read a tensor's values on the host (on CUDA: wait for the device).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class Scores:
    """A logits processor that keeps a copy of every step's scores and the tokens it was shown."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        self.lengths.append(input_ids.shape[1])
        return scores


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loop_reproduces_generate_with_a_static_cache_on_every_family(family, cache_dir):
    """Tokens, and the float32 scores the processors see at every step, equal generate()'s with a static cache."""
    ref, store, _, prompts = synthetic_fp32(family, cache_dir)
    static, _ = load_variant(ref, Recipe(name="static", steps=(KVCache(mode="static"),)), "cpu", store)
    want, seen = Scores(), Scores()
    expected = greedy_generate(static, prompts, NEW, [want])  # transformers' own loop (eager static cache)
    decoder = StaticDecoder()  # no compile: the loop alone
    got = decoder.generate(static.model, prompts, NEW, [seen])
    assert torch.equal(got, expected), family
    assert seen.lengths == want.lengths == list(range(12, 12 + NEW))
    for step, (a, b) in enumerate(zip(seen.scores, want.scores, strict=True)):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (2, static.model.config.vocab_size)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{family}: step {step}")
    again = decoder.generate(static.model, prompts, NEW)  # the kept cache, reset: nothing of the last call leaks
    assert torch.equal(again, expected), family


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_compiled_static_kv_variant_keeps_eager_tokens_on_every_family(family, cache_dir):
    """The built-in ``static-kv`` (one graph for the decode step, no break allowed) on each architecture."""
    ref, store, eager, prompts = synthetic_fp32(family, cache_dir)
    torch._dynamo.reset()
    compiled, _ = load_variant(ref, builtin_variant("static-kv"), "cpu", store)
    assert torch.equal(greedy_generate(compiled, prompts, NEW), greedy_generate(eager, prompts, NEW)), family


@pytest.mark.slow
def test_the_compiled_step_runs_torchao_weights_with_their_eager_tokens(tiny_ref, cache_dir):
    """Quantized weights under the compiled loop (torchao's tensor subclasses, traced as one graph).

    A recipe of a torchao step then the static cache decodes with the loop and keeps the
    eager quantized variant's tokens; it shares that variant's artifact.
    """
    from optimize.quantize.torchao import TorchAO

    store = VariantStore(cache_dir)
    eager, eager_artifact = load_variant(tiny_ref, Recipe(name="ao", steps=(TorchAO(),)), "cpu", store)
    prompts, _ = prompt_ids(tiny_ref, eager.model.config.vocab_size, 2, 12)
    torch._dynamo.reset()
    recipe = Recipe(name="ao-static", steps=(TorchAO(), KVCache(mode="static", compile=True)))
    compiled, artifact = load_variant(tiny_ref, recipe, "cpu", store)
    assert decode_loop(compiled).startswith("the variant's own greedy loop"), decode_loop(compiled)
    assert artifact.path == eager_artifact.path
    assert torch.equal(greedy_generate(compiled, prompts, NEW), greedy_generate(eager, prompts, NEW))


def test_the_cache_is_kept_for_the_same_shape_and_replaced_for_another(tiny_ref, cache_dir):
    state, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))
    prompts, _ = prompt_ids(tiny_ref, state.model.config.vocab_size, 2, 12)
    decoder = StaticDecoder()
    decoder.generate(state.model, prompts, NEW)
    first = decoder._cache
    keys = first.layers[0].keys.data_ptr()
    decoder.generate(state.model, prompts, NEW)
    assert decoder._cache is first and first.layers[0].keys.data_ptr() == keys  # what a captured graph reads
    decoder.generate(state.model, prompts[:1], NEW)
    assert decoder._cache is not first and decoder._cache.layers[0].keys.shape[0] == 1
    decoder.generate(state.model, prompts, NEW + 1)
    assert decoder._cache.layers[0].keys.shape[2] == 12 + NEW + 1  # max_cache_len: prompt + new tokens


def test_a_static_compiled_variant_decodes_with_the_loop_and_generate_does_not(tiny_ref, cache_dir):
    compiled, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    assert isinstance(compiled.decoder, StaticDecoder)
    assert compiled.decoder.compile_config.fullgraph and compiled.decoder.compile_config.mode == "default"
    assert compiled.generate_kwargs == {"cache_implementation": "static"}  # the decoder holds the compile settings
    assert any("greedy decode loop of its own" in label for label in compiled.labels)
    eager, _ = load_variant(tiny_ref, Recipe(name="static", steps=(KVCache(mode="static"),)), "cpu",
                            VariantStore(cache_dir))
    assert eager.decoder is None  # an eager static cache is measured in generate(), as transformers runs it
    assert decode_loop(compiled).startswith("the variant's own greedy loop (optimize.decode)")
    assert decode_loop(eager).startswith("transformers generate()")


@pytest.mark.slow
def test_decode_steps_read_nothing_back_from_the_device(tiny_ref, cache_dir, monkeypatch):
    """No step reads a tensor on the host, nor does the prompt's pass (generate() does twice a token).

    On CUDA such a read waits for the device, so the host could not queue the next step while
    the GPU runs this one. Every Python-level way of reading a tensor is counted while the
    compiled loop runs; each step's processor call sees how many there were so far.
    """
    state, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    prompts, _ = prompt_ids(tiny_ref, state.model.config.vocab_size, 2, 12)
    expected = greedy_generate(state, prompts, NEW)  # compiles the step
    reads: list[str] = []
    at_step: list[int] = []

    def counted(name, method):
        def read(self, *args, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)
        return read

    def processor(input_ids, scores):
        at_step.append(len(reads))
        return scores

    def generate(state):
        reads.clear(), at_step.clear()
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
            return greedy_generate(state, prompts, NEW, [processor])

    assert torch.equal(generate(state), expected)
    assert len(at_step) == NEW and at_step[-1] == at_step[0], (at_step, reads)  # none between first and last
    assert at_step[0] == 0, reads  # nor before the first: the prompt's pass queues its work as well
    state.decoder = None  # the same variant through generate(): the count would see its reads
    generate(state)
    assert at_step[-1] - at_step[0] >= NEW - 1, (at_step, reads)


def test_the_prompts_pass_builds_a_causal_mask_alone(tiny_ref, cache_dir, monkeypatch):
    """Causality hides the empty slots of the static cache from the prompt: no padding mask is built.

    transformers builds a padding mask from a 2D attention mask (one vmapped function more per
    element of a (B, 1, P, P + N) mask: 2 ms of the prefill's 12 on a 2-core CPU); the tokens stay
    generate()'s (the family tests).
    """
    import transformers.masking_utils as masking

    state, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    prompts, _ = prompt_ids(tiny_ref, state.model.config.vocab_size, 2, 12)
    built: list[int] = []
    made = masking.padding_mask_function

    def counted(mask):
        if not torch.compiler.is_compiling():  # the compiled step's mask is made inside its graph
            built.append(mask.shape[-1])
        return made(mask)

    monkeypatch.setattr(masking, "padding_mask_function", counted)
    greedy_generate(state, prompts, NEW)
    assert built == []
    state.decoder = None  # generate() with the same static cache: the count sees its padding masks
    greedy_generate(state, prompts, NEW)
    assert built, "the count missed generate()'s padding masks"


def test_only_the_first_decode_step_of_a_call_checks_every_guard(tiny_ref, cache_dir):
    """Steps after the first run under ``skip_guard_eval_unsafe``: the compiled step's full guard check once a call."""
    from torch._dynamo import eval_frame

    state, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    prompts, _ = prompt_ids(tiny_ref, state.model.config.vocab_size, 2, 12)
    skipping: list[bool] = []

    def processor(input_ids, scores):
        skipping.append(eval_frame._stance.skip_guard_eval_unsafe)
        return scores

    for _ in range(2):  # the first call compiles
        skipping.clear()
        greedy_generate(state, prompts, NEW, [processor])
        assert skipping == [False, False] + [True] * (NEW - 2)  # prefill, first step, then the rest
    assert not eval_frame._stance.skip_guard_eval_unsafe  # put back
    eager = StaticDecoder()  # nothing compiled: no guards to skip
    skipping.clear()
    eager.generate(state.model, prompts.to(state.device), NEW, [processor])
    assert skipping == [False] * NEW


@pytest.mark.cuda
def test_on_cuda_the_graphed_loop_never_waits_for_the_device_and_keeps_eager_tokens(cuda_only, tiny_ref, cache_dir):
    """The CUDA-graph decode step: eager fp32's tokens, and no synchronisation from the first token to the last."""
    store = VariantStore(cache_dir)
    eager, _ = load_variant(tiny_ref, Recipe(name="fp32"), "cuda", store)
    prompts, _ = prompt_ids(tiny_ref, eager.model.config.vocab_size, 2, 12)
    expected = greedy_generate(eager, prompts, NEW)
    recipe = Recipe(name="graphs", steps=(KVCache(mode="static", compile=True, compile_mode="reduce-overhead"),))
    torch._dynamo.reset()
    state, _ = load_variant(tiny_ref, recipe, "cuda", store)
    for _ in range(3):  # compile, then warm-up and capture of the graph
        assert torch.equal(greedy_generate(state, prompts, NEW), expected)
    steps = []

    def strict(input_ids, scores):
        if not steps:
            torch.cuda.set_sync_debug_mode("error")  # from here on a synchronising call raises
        steps.append(input_ids.shape[1])
        return scores

    try:
        tokens = greedy_generate(state, prompts, NEW, [strict])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == list(range(12, 12 + NEW))
    assert torch.equal(tokens, expected)


def test_a_model_that_does_not_declare_a_whole_graph_forward_is_not_compiled(tiny_ref, cache_dir, monkeypatch):
    """transformers' own flag says which models torch.compile can take as one graph with a static cache."""
    from optimize.errors import NotApplicable

    state, _ = load_variant(tiny_ref, builtin_variant("static-kv"), "cpu", VariantStore(cache_dir))
    assert state.model._can_compile_fullgraph  # Llama declares it
    monkeypatch.setattr(type(state.model), "_can_compile_fullgraph", False)  # a model written without one in mind
    prompts, _ = prompt_ids(tiny_ref, state.model.config.vocab_size, 2, 12)
    with pytest.raises(NotApplicable, match="LlamaForCausalLM does not declare its forward compilable as one"):
        greedy_generate(state, prompts, NEW)  # the cell records it skipped, with this reason
    eager = greedy_generate(load_variant(tiny_ref, Recipe(name="fp32"), "cpu", VariantStore(cache_dir))[0], prompts,
                            NEW)
    assert torch.equal(StaticDecoder().generate(state.model, prompts, NEW), eager)  # an eager step makes no promise
