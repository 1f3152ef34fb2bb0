"""Train the built-in reference model from scratch on the CPU.

A plain PyTorch loop: AdamW, linear warm-up then cosine decay, fixed seed, random
windows of the tokenized training stream. Everything the model card states is measured
here, not typed in.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from optimize.atomic import build_dir_atomically, folder_problem, sweep_stale_tmp
from optimize.errors import InputError
from optimize.reference.corpus import Corpus, CorpusConfig, build_corpus, stdlib_root, write_manifest
from optimize.reference.tokenizer import train_tokenizer

# The byte-level BPE always holds the 256 byte tokens and the two special tokens, whatever
# vocabulary it is asked for; a smaller embedding would be indexed out of range.
MIN_VOCAB_SIZE = 256 + 2


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and optimisation settings of the reference model."""

    vocab_size: int = 8192
    hidden_size: int = 256  # multiple of 64
    intermediate_size: int = 768  # multiple of 64; bnb NF4 needs widths like this
    num_layers: int = 6
    num_heads: int = 8  # head_dim 32
    num_kv_heads: int = 4  # grouped-query attention, 2 query heads per KV head
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2600
    lr: float = 2e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # 0: torch's default
    eval_context: int = 256  # perplexity windows for the model card
    log_every: int = 50
    version: int = 1

    def validate(self) -> None:
        """Raise ``InputError`` naming the first setting the model or the training loop cannot take."""
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings", "batch_size", "steps", "log_every"):
            _check(name, getattr(self, name), _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                   "must be a positive integer")
        _check("vocab_size", self.vocab_size, _is_int(self.vocab_size) and self.vocab_size >= MIN_VOCAB_SIZE,
               f"must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens and 2 special tokens)")
        for name in ("seq_len", "eval_context"):
            value = getattr(self, name)
            _check(name, value, _is_int(value) and value >= 2, "must be an integer >= 2 (a window needs a token to "
                   "predict after its first)")
            _check(name, value, value <= self.max_position_embeddings,
                   f"must be at most --max-position-embeddings ({self.max_position_embeddings})")
        _check("warmup_steps", self.warmup_steps, _is_int(self.warmup_steps) and self.warmup_steps >= 0,
               "must be an integer >= 0")
        _check("threads", self.threads, _is_int(self.threads) and self.threads >= 0,
               "must be an integer >= 0 (0: torch's default)")
        _check("seed", self.seed, _is_int(self.seed) and 0 <= self.seed < 2**63, "must be an integer in [0, 2**63)")
        _check("lr", self.lr, _is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0,
               "must be a finite positive number")
        _check("min_lr_fraction", self.min_lr_fraction, _is_real(self.min_lr_fraction)
               and 0 <= self.min_lr_fraction <= 1, "must be in [0, 1]")
        _check("weight_decay", self.weight_decay, _is_real(self.weight_decay) and math.isfinite(self.weight_decay)
               and self.weight_decay >= 0, "must be a finite number >= 0")
        _check("grad_clip", self.grad_clip, _is_real(self.grad_clip) and self.grad_clip > 0,
               "must be a positive number (inf: no clipping)")
        _check("hidden_size", self.hidden_size, self.hidden_size % self.num_heads == 0,
               f"must be a multiple of --num-heads ({self.num_heads})")
        head_dim = self.hidden_size // self.num_heads
        _check("hidden_size", self.hidden_size, head_dim % 2 == 0,
               f"gives an odd head size {head_dim} with --num-heads {self.num_heads}; rotary embeddings need an "
               "even one")
        _check("num_kv_heads", self.num_kv_heads, self.num_heads % self.num_kv_heads == 0,
               f"must divide --num-heads ({self.num_heads}): each KV head serves a whole group of query heads")


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise InputError(f"--{name.replace('_', '-')} {value}: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that is not a new or empty directory we can create and rename into place."""
    if out_dir.is_symlink():
        raise InputError(f"--out {out_dir}: is a symbolic link; give a new or empty directory")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"--out {out_dir}: is a file; give a new or empty directory")
        if any(out_dir.iterdir()):
            raise InputError(f"--out {out_dir}: exists and is not empty; give a new or empty directory")
    # The model is built in a sibling and renamed into place: its folder must take new entries.
    problem = folder_problem(out_dir.absolute().parent)
    if problem:
        raise InputError(f"--out {out_dir}: its folder {out_dir.absolute().parent} {problem}")


def check_windows(corpus_cfg: CorpusConfig, cfg: TrainConfig, train_len: int, eval_len: int, unit: str) -> None:
    """Refuse training text without one ``seq_len + 1`` window or evaluation text without one ``eval_context`` one."""
    where = f"--stdlib-root {corpus_cfg.root or stdlib_root(corpus_cfg)}"
    if train_len <= cfg.seq_len:
        raise InputError(f"{where}: the training text is {train_len:,} {unit}, too short for one window of "
                         f"--seq-len {cfg.seq_len} (needs more than {cfg.seq_len} tokens)")
    if eval_len < cfg.eval_context:
        raise InputError(f"{where}: the evaluation text (held-out library files) is {eval_len:,} {unit}, too short "
                         f"for one window of --eval-context {cfg.eval_context}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, cosine to ``min_lr_fraction``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * cosine)


def encode_stream(tokenizer, text: str):
    """Token ids of ``text`` as one int64 tensor, encoded in line blocks for speed."""
    import torch

    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i : i + 500]) for i in range(0, len(lines), 500)]
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(blocks):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def windowed_nll(model, ids, context: int) -> tuple[float, int]:
    """Summed NLL and count over non-overlapping windows, every token but each window's first."""
    import torch

    total, count = 0.0, 0
    n_windows = len(ids) // context
    with torch.inference_mode():
        for w in range(0, n_windows, 8):
            batch = ids[w * context : min(n_windows, w + 8) * context].view(-1, context)
            logits = model(batch).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, T-1)
            total += nll.double().sum().item()
            count += nll.numel()
    return total, count


def unigram_nll(train_ids, eval_ids, vocab_size: int, context: int) -> float:
    """Mean NLL of the scored eval tokens under add-one-smoothed training unigram counts."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = torch.log(counts / counts.sum())
    n_windows = len(eval_ids) // context
    scored = eval_ids[: n_windows * context].view(n_windows, context)[:, 1:]
    return float(-logp[scored].mean())


def train_reference(out_dir: Path, cfg: TrainConfig = TrainConfig(),
                    corpus_cfg: CorpusConfig = CorpusConfig(), progress=print) -> dict:
    """Build corpus, tokenizer and model from scratch and save a Hugging Face model directory.

    Every input is checked before anything is written (``InputError`` otherwise). The directory
    is built in a temporary sibling and renamed to ``out_dir`` when complete, so a failure or an
    interrupt leaves nothing at ``out_dir``; the sibling of a build killed outright is removed by
    the next build of the same ``out_dir`` (only that one: the folder is the user's).
    """
    t_start = time.perf_counter()
    cfg.validate()
    check_out_dir(out_dir)
    sweep_stale_tmp(out_dir.absolute().parent, of=out_dir.name)  # an earlier build of it, killed
    corpus = build_corpus(corpus_cfg)
    # A byte-level BPE token covers at least one byte: the byte counts bound the token counts.
    check_windows(corpus_cfg, cfg, len(corpus.train_text.encode()), len(corpus.eval_text.encode()), "bytes")
    # Trained before the output exists, so a corpus too short in tokens is refused with nothing
    # written; the tokenizer is saved into the model directory with the rest.
    with tempfile.TemporaryDirectory(prefix="infermatrix-tokenizer-") as scratch:
        tokenizer = train_tokenizer(corpus.train_text, cfg.vocab_size, Path(scratch))
    train_ids = encode_stream(tokenizer, corpus.train_text)
    eval_ids = encode_stream(tokenizer, corpus.eval_text)
    check_windows(corpus_cfg, cfg, len(train_ids), len(eval_ids), "tokens")
    progress(f"corpus: {len(train_ids):,} train tokens, {len(eval_ids):,} eval tokens")

    summary: dict = {}

    def fill(tmp: Path) -> None:
        write_manifest(corpus, tmp / "corpus-manifest.json")
        (tmp / "eval.txt").write_text(corpus.eval_text, encoding="utf-8")
        tokenizer.save_pretrained(str(tmp))
        summary.update(_train_and_save(tmp, cfg, corpus, tokenizer, train_ids, eval_ids, progress, t_start))

    build_dir_atomically(out_dir, fill)
    written = out_dir / "training.json"
    if not written.is_file() or written.read_text() != _summary_json(summary):
        raise InputError(f"--out {out_dir}: filled by another process during training; this model was discarded")
    return summary


def _summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=1) + "\n"


def _train_and_save(out_dir: Path, cfg: TrainConfig, corpus: Corpus, tokenizer, train_ids, eval_ids, progress,
                    t_start: float) -> dict:
    """Train on ``train_ids``, measure on ``eval_ids``, save weights, summary and model card in ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    log = []
    t_train = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(train_ids) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()])  # (B, T)
        # The model shifts labels itself: position t predicts token t+1.
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - t_train
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step, cfg),
                        "elapsed_s": round(elapsed, 1)})
            progress(f"step {step}/{cfg.steps} loss {loss.item():.3f} elapsed {elapsed:.0f}s")
    train_s = time.perf_counter() - t_train

    model.eval()
    nll, count = windowed_nll(model, eval_ids, cfg.eval_context)
    ppl = math.exp(nll / count)
    uni_ppl = math.exp(unigram_nll(train_ids, eval_ids, cfg.vocab_size, cfg.eval_context))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    summary = {
        "samples": greedy_samples(model, tokenizer),
        "parameters": n_params,
        "train_tokens": len(train_ids),
        "eval_tokens": len(eval_ids),
        "scored_eval_tokens": count,
        "eval_perplexity": round(ppl, 3),
        "unigram_perplexity": round(uni_ppl, 2),
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "corpus_train_sha256": corpus.manifest["train_sha256"],
        "corpus_eval_sha256": corpus.manifest["eval_sha256"],
        "config": asdict(cfg),
        "log": log,
    }
    (out_dir / "training.json").write_text(_summary_json(summary))
    (out_dir / "README.md").write_text(model_card(summary, corpus.manifest))
    return summary


SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n\ndef read_file(path):", "class Stack:\n    def push(self, item):")
SAMPLE_TOKENS = 48


def greedy_samples(model, tokenizer) -> list[dict]:
    """Greedy continuations of fixed prompts, for the model card."""
    import torch

    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SAMPLE_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": prompt, "continuation": tokenizer.decode(gen[0, ids.shape[1]:])})
    return out


def model_card(s: dict, manifest: dict) -> str:
    c = s["config"]
    return f"""# pycode: the built-in reference model of infermatrix

A small Llama-architecture causal language model trained from scratch on the source code
of the CPython {manifest['python_version']} standard library, so that accuracy drift can be
measured offline with a real (trained) model. It writes plausible Python; it is not useful
for anything else.

| | |
|---|---|
| architecture | LlamaForCausalLM: RoPE, SwiGLU, RMSNorm, grouped-query attention, tied embeddings |
| parameters | {s['parameters']:,} |
| layers / hidden / FFN | {c['num_layers']} / {c['hidden_size']} / {c['intermediate_size']} |
| heads / KV heads / head dim | {c['num_heads']} / {c['num_kv_heads']} / {c['hidden_size'] // c['num_heads']} |
| context | {c['max_position_embeddings']} (trained on windows of {c['seq_len']}) |
| tokenizer | byte-level BPE, vocabulary {c['vocab_size']}, trained with `tokenizers` on the training split |
| weights | fp32 safetensors |

## Data
Every `*.py` file under the stdlib root (excluding site-packages and files over 400 kB), in
sorted path order; a file is held out when the first 8 bytes of sha256(relative path) fall
below {manifest['config']['eval_fraction']} of 2**64. `corpus-manifest.json` lists every file.

- training text: {manifest['train_files']} files, {manifest['train_bytes']:,} bytes, sha256 `{manifest['train_sha256']}`
- evaluation text (`eval.txt`, frozen): held-out library files (no tests, no generated codec or
  pydoc tables), whole files in path order, {manifest['eval_text_bytes']:,} bytes,
  sha256 `{manifest['eval_sha256']}`

## Training
`infermatrix train-reference --out DIR` (defaults of `optimize.reference.train.TrainConfig`):
AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak learning rate {c['lr']}, {c['warmup_steps']} warm-up
steps then cosine decay to {c['min_lr_fraction']} of the peak, batch {c['batch_size']} x {c['seq_len']} tokens,
{s['steps']} steps ({s['tokens_seen']:,} tokens), seed {c['seed']}, fp32 on the CPU with {s['torch_threads']} threads,
torch {s['torch_version']}. Training wall time {s['train_wall_s'] / 60:.1f} minutes.

## Quality
Token-level perplexity on `eval.txt`, tokenized as one stream, cut into non-overlapping
windows of {c['eval_context']} tokens, every token but each window's first scored ({s['scored_eval_tokens']:,} tokens):

- **held-out perplexity: {s['eval_perplexity']}**
- unigram baseline on the same tokens (training-set token frequencies): {s['unigram_perplexity']}

## Greedy samples
The byte-level BPE merges a newline with the next line's indentation (`"\\n    "` is one
token), so a prompt that ends in a bare newline sits on a token boundary the model rarely
saw in training; end prompts before the newline, as below.

""" + "\n".join(f"```python\n{x['prompt']}{x['continuation']}\n```" for x in s.get("samples", [])) + "\n"
