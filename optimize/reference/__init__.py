"""The built-in reference model: a small Llama trained on Python standard-library source.

``corpus`` reads the training text, ``tokenizer`` trains the byte-level BPE, ``train``
trains and saves the model; the shipped result lives in ``pycode/`` beside this file.
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "pycode"
EVAL_TEXT = BUILTIN_DIR / "eval.txt"
