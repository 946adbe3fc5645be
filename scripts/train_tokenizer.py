"""Train the bundled tokenizer: a byte-level BPE (GPT-2 style, no unknown tokens) on the bundled corpus.

Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``, matching the presets' ``pad/bos/eos_token_id``. A small
vocabulary keeps the embedding and LM-head of CPU-sized models small.

    python scripts/train_tokenizer.py          # writes src/densessm/resources/tokenizer/
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

from densessm.tokenizer import train_bpe

RESOURCES = Path(__file__).resolve().parents[1] / "src" / "densessm" / "resources"


def texts(corpus: Path):
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=RESOURCES / "sotu" / "sotu.jsonl.xz")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESOURCES / "tokenizer")
    args = parser.parse_args()

    wrapped = train_bpe(texts(args.corpus), args.vocab_size)
    wrapped.save_pretrained(args.out)
    print(f"byte-level BPE, {len(wrapped)} tokens, trained on {args.corpus.name} -> {args.out}")


if __name__ == "__main__":
    main()
