"""Put back, one at a time, bugs the suite once missed, and check that a test now fails for each.

Each bug is a textual replacement in one source file; the file is restored afterwards.
Usage: python ci/mutation/reinsert_bugs.py (from the repository root).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BUGS = [
    ("first record of a cell wins on load", "bench/results.py",
     '    latest = {r["cell_id"]: r for r in records}',
     '    latest = {}\n    for r in records:\n        latest.setdefault(r["cell_id"], r)',
     ["tests/bench/test_results_loading.py"]),
    ("shards in contiguous chunks dropping the remainder", "bench/orchestrate.py",
     "        return [c for k, c in enumerate(cells) if k % self.count == self.index - 1]",
     "        size = len(cells) // self.count\n        return cells[(self.index - 1) * size:self.index * size]",
     ["tests/bench/test_shard.py"]),
    ("magnitude pruning prunes 1 - sparsity", "optimize/prune/magnitude.py",
     "prune.l1_unstructured(module, name, amount=self.sparsity)",
     "prune.l1_unstructured(module, name, amount=1 - self.sparsity)",
     ["tests/optimize/test_prune_selection.py", "-k", "layer_scope or through_the_store"]),
    ("random pruning instead of smallest magnitude", "optimize/prune/magnitude.py",
     "prune.l1_unstructured(module, name, amount=self.sparsity)",
     "prune.random_unstructured(module, name, amount=self.sparsity)",
     ["tests/optimize/test_prune_selection.py", "-k", "layer_scope or through_the_store"]),
    ("random global pruning instead of smallest magnitude", "optimize/prune/magnitude.py",
     "pruning_method=prune.L1Unstructured", "pruning_method=prune.RandomUnstructured",
     ["tests/optimize/test_prune_selection.py", "-k", "global_scope"]),
    ("prefill FLOPs without the attention term", "bench/metrics/roofline.py",
     "    return float(linear + attention)", "    return float(linear)",
     ["tests/bench/test_roofline.py"]),
    ("prefill rate ignores batch size", "bench/scenarios/sweeps.py",
     "rates = [scenario.batch_size * scenario.prompt_tokens / (t / 1e3) for t in ttft]",
     "rates = [scenario.prompt_tokens / (t / 1e3) for t in ttft]",
     ["tests/bench/test_scenarios.py", "-k", "prefill"]),
    ("held-out split by the salted hash()", "optimize/reference/corpus.py",
     '    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction',
     "    return (hash(relative_path) % 2**32) / 2**32 < eval_fraction",
     ["tests/optimize/test_reference_training.py", "-k", "split"]),
    ("the LM head counted on every prompt position of a transformers prefill", "optimize/introspect.py",
     'kept = {"logits_to_keep": 1} if last_logits_only', "kept = {} if last_logits_only",
     ["tests/bench/test_roofline.py", "-k", "counted_prefill or backend_runs"]),
    ("roofline ceilings measured on torch's default threads, not the cells'", "bench/cell.py",
     '            torch.set_num_threads(job["threads"])', "            pass",
     ["tests/bench/test_roofline.py", "-k", "prefill_sweep_run"]),
]


def main() -> int:
    caught_all = True
    for title, path, old, new, tests in BUGS:
        file = Path(path)
        original = file.read_text()
        if original.count(old) != 1:
            print(f"CANNOT APPLY  {title}: pattern not found once in {path}")
            caught_all = False
            continue
        file.write_text(original.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                 capture_output=True, text=True)
        finally:
            file.write_text(original)
        failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
        caught = run.returncode == 1 and failed
        caught_all &= bool(caught)
        print(f"{'caught' if caught else 'MISSED'}  {title} ({path}): {failed[0] if failed else run.stdout[-300:]}")
    return 0 if caught_all else 1


if __name__ == "__main__":
    sys.exit(main())
