"""Text side of CTC: transcript normalisation and the character vocabulary.

CTC predicts one character (or the blank) per output frame (20 ms in wav2vec2, 40 ms in the fresh
conformer), so the vocabulary is the set of characters in the transcripts, with `|` standing for
the space between words, `<pad>` doubling as the CTC blank and `<unk>` for characters never seen
in training. When a base model brings its own tokenizer, its ids are kept (its output layer already
knows them) and new characters are appended, so fine-tuning starts from what the base knows instead of from a shuffled head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PAD, UNK, BOS, EOS, DELIMITER = "<pad>", "<unk>", "<s>", "</s>", "|"

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def normalise(text: str, chars_to_ignore: str, uppercase: bool = False) -> str:
    """What the model is trained to output and what WER is computed on: one case, typographic quotes
    folded, the ignored punctuation removed, whitespace collapsed."""
    text = text.translate(_QUOTES)
    if chars_to_ignore:
        text = re.sub(f"[{re.escape(chars_to_ignore)}]", " ", text)
    text = text.upper() if uppercase else text.lower()
    return " ".join(text.split())


def characters(texts: list[str]) -> list[str]:
    """The sorted characters of the (normalised) transcripts, the space as the word delimiter."""
    chars = set()
    for t in texts:
        chars.update(t)
    chars.discard(" ")
    return [DELIMITER] + sorted(chars - {DELIMITER})


def fresh_vocab(chars: list[str]) -> dict[str, int]:
    """<pad> (the CTC blank) first, then the same special tokens as wav2vec2-base-960h, then characters."""
    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    return vocab


def base_is_uppercase(vocab: dict[str, int]) -> bool:
    """English wav2vec2 CTC checkpoints spell in capitals; continuing one, transcripts are upper-cased
    so its trained rows are used instead of new lower-case ones."""
    letters = [k for k in vocab if len(k) == 1 and k.isalpha()]
    return bool(letters) and all(k.isupper() for k in letters)


def merge_vocab(base: dict[str, int], chars: list[str], delimiter: str, head_size: int) -> tuple[dict[str, int], list[str]]:
    """The base's ids unchanged; characters it lacks appended after its largest id (and after its
    output layer's rows). Returns the merged vocabulary and the characters added."""
    merged = dict(base)
    next_id = max([head_size - 1, *merged.values()]) + 1
    added = []
    for c in chars:
        token = delimiter if c == DELIMITER else c
        if token not in merged:
            merged[token] = next_id
            next_id += 1
            added.append(token)
    return merged, added


def write_vocab(vocab: dict[str, int], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.json"
    path.write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    return path
