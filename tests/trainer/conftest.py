"""Trainer test fixtures: a tiny corpus and sentencepiece model shared by the whole session."""
import os
import sys

import pytest

# Test modules import cli_support by name (pytest runs with --import-mode=importlib, which adds no paths).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Twenty small 'documents' of Python-ish text and a 320-token sentencepiece model trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    import random
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "value", "items",
             "range", "print", "len", "list", "dict", "key", "x", "y", "=", "(", ")", ":", "+", "1", "0"]
    for i in range(20):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(rng.randint(20, 60))]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    from mosaicjax.data import tokenizers
    model = tokenizers.train_sentencepiece(
        (p.read_text() for p in sorted(root.glob("*.txt"))), str(root / "tok"), vocab_size=320)
    return {"glob": str(root / "*.txt"), "tokenizer": model}


