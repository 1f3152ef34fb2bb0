"""Byte-level BPE tokenizer trained with the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path

BOS, EOS = "<s>", "</s>"


def train_tokenizer(text: str, vocab_size: int, out_dir: Path):
    """Train a byte-level BPE on ``text`` and save it where ``AutoTokenizer`` loads it.

    Returns the ``transformers.PreTrainedTokenizerFast`` wrapping the trained tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Feed by line blocks: the trainer parallelises over the iterator's items.
    lines = text.splitlines(keepends=True)
    chunks = ("".join(lines[i : i + 200]) for i in range(0, len(lines), 200))
    tok.train_from_iterator(chunks, trainer=trainer)
    # A decoder-only model takes no token_type_ids: without this, generate(**tok(text)) raises.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.pad_token = EOS
    fast.model_max_length = 512
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
