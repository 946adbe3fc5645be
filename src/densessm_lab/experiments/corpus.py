"""Pure text handling for the experiment corpus: per-format extraction, normalisation, dedup and a
seeded split by document.

Kept free of network and file-system access so the whole pipeline after the download is testable on
tiny strings; ``scripts/build_experiment_corpus.py`` does the fetching and writing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from html.entities import name2codepoint
from html.parser import HTMLParser

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)
MIN_CHARS = 200


@dataclass(frozen=True)
class Document:
    """One unit of splitting: a speech, a Brown file or a documentation page."""

    source: str
    doc_id: str
    text: str


def normalise(text: str) -> str:
    """NFC, Unix newlines, tabs expanded, trailing blanks and runs of blank lines removed.

    Leading indentation is kept on purpose: the documentation sources contain code blocks whose
    structure is part of what a language model should see.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.expandtabs(4).rstrip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    return "\n".join(out).strip("\n").strip()


_ATTACH_LEFT = re.compile(r"^(?:[,.;:!?)\]}]+|''|'s|n't|'d|'ll|'re|'ve|'m)$")
_ATTACH_RIGHT = {"``", "(", "[", "{"}


def _detokenise(words: list[str]) -> str:
    """Join Brown tokens with spaces except around punctuation, mapping `` and '' to double quotes."""
    out = ""
    glue = True
    for word in words:
        if out and not glue and not _ATTACH_LEFT.match(word):
            out += " "
        out += '"' if word in ("``", "''") else word
        glue = word in _ATTACH_RIGHT
    return out


def strip_brown_tags(text: str) -> str:
    """Turn a tagged Brown file (``word/tag`` tokens, one sentence a line) into plain prose.

    The tag is what follows the last slash, so tokens like ``1/2/cd`` keep ``1/2``; sentences of a
    paragraph are joined with spaces and paragraphs are separated by a blank line.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for raw in text.split("\n"):
        if not raw.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        words = [token.rsplit("/", 1)[0] if "/" in token else token for token in raw.split()]
        current.append(_detokenise(words))
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}
_POD_CODE_MULTI = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")


def _pod_escape(inner: str) -> str:
    if inner in _POD_ESCAPES:
        return _POD_ESCAPES[inner]
    if inner in name2codepoint:
        return chr(name2codepoint[inner])
    try:
        if inner.lower().startswith("0x"):
            return chr(int(inner, 16))
        return chr(int(inner, 8) if inner.startswith("0") and len(inner) > 1 else int(inner))
    except ValueError:
        return inner


def _pod_code(letter: str, inner: str) -> str:
    if letter in "XZ":
        return ""
    if letter == "E":
        return _pod_escape(inner)
    if letter == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[0].strip('"') or inner
    return inner


def pod_to_text(pod: str) -> str:
    """Plain text from Perl POD: headings and items keep their text, other commands and formatting
    codes (``B<...>``, ``L<text|target>``, ``E<gt>``) are removed."""
    lines: list[str] = []
    skipping = False
    for line in pod.split("\n"):
        if line.startswith("="):
            command, _, rest = line[1:].partition(" ")
            if command == "begin":
                skipping = True
            elif command == "end":
                skipping = False
            elif command.startswith("head") or command == "item":
                lines.append(rest.strip())
            continue
        if not skipping:
            lines.append(line)
    text = "\n".join(lines)
    text = _POD_CODE_MULTI.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
    previous = None
    while previous != text:
        previous = text
        text = _POD_CODE.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
    return text


class _HTMLText(HTMLParser):
    """Collects visible text, dropping head/script/style and the DocBook navigation bars."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "title"}
    SKIP = {"head", "script", "style"}
    SKIP_CLASSES = {"navheader", "navfooter"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"br", "img", "hr", "meta", "link", "input"}:
            if tag == "br":
                self.parts.append("\n")
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in self.SKIP or bool(classes & self.SKIP_CLASSES)
        self.stack.append((tag, skip))
        self.skip_depth += skip
        self.pre_depth += tag == "pre"
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag not in {open_tag for open_tag, _ in self.stack}:
            return  # a void element's self-closing form, or a stray end tag
        while self.stack:
            open_tag, skip = self.stack.pop()
            self.skip_depth -= skip
            self.pre_depth -= open_tag == "pre"
            if open_tag == tag:
                break
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:
            self.parts.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.parts or self.parts[-1].endswith("\n"):
            data = data.lstrip()
        if data:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, one block element a paragraph, ``<pre>`` kept verbatim."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def text_hash(text: str) -> str:
    """Identity of a normalised document for exact deduplication."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Prepared:
    """Documents after filtering, and how many were removed at each step (for the data card)."""

    documents: list[Document]
    dropped_short: dict[str, int]
    dropped_duplicate: dict[str, int]


def prepare(documents: Iterable[Document], min_chars: int = MIN_CHARS) -> Prepared:
    """Normalise, drop documents shorter than ``min_chars`` and exact duplicates.

    Documents are first ordered by (source, doc_id) so the copy that survives a duplicate is the same
    whatever order the inputs came in.
    """
    kept: list[Document] = []
    seen: set[str] = set()
    short: dict[str, int] = {}
    dupes: dict[str, int] = {}
    for doc in sorted(documents, key=lambda d: (d.source, d.doc_id)):
        text = normalise(doc.text)
        if len(text) < min_chars:
            short[doc.source] = short.get(doc.source, 0) + 1
            continue
        digest = text_hash(text)
        if digest in seen:
            dupes[doc.source] = dupes.get(doc.source, 0) + 1
            continue
        seen.add(digest)
        kept.append(Document(doc.source, doc.doc_id, text))
    return Prepared(kept, short, dupes)


def split_documents(
    documents: Iterable[Document], seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[Document]]:
    """Shuffle with ``seed`` and cut into train/validation/test, whole documents only.

    The cut is made per source (stratified) so every source is represented in the held-out splits;
    validation and test get ``round(n * fraction)`` documents (at least one each once a source has
    three), train the rest. Each split is then shuffled so sources are interleaved.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[Document]] = {}
    for doc in sorted(documents, key=lambda d: (d.source, d.doc_id)):
        by_source.setdefault(doc.source, []).append(doc)
    out: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for source in sorted(by_source):
        docs = by_source[source]
        rng.shuffle(docs)
        n = len(docs)
        n_val = max(round(n * fractions[1]), 1 if n >= 3 else 0)
        n_test = max(round(n * fractions[2]), 1 if n >= 3 else 0)
        out["validation"] += docs[:n_val]
        out["test"] += docs[n_val : n_val + n_test]
        out["train"] += docs[n_val + n_test :]
    for name in SPLITS:
        rng.shuffle(out[name])
    return out


def to_jsonl(documents: Iterable[Document]) -> str:
    """``{"text": ..., "source": ...}`` per line; stable key order and escaping for byte-identical files."""
    return "".join(
        json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False, sort_keys=True) + "\n" for d in documents
    )


def split_stats(splits: dict[str, list[Document]]) -> dict[str, dict[str, dict[str, int]]]:
    """Documents, characters and UTF-8 bytes per split and source (plus an ``all`` row per split)."""
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for name, docs in splits.items():
        rows: dict[str, dict[str, int]] = {}
        for doc in docs:
            for key in (doc.source, "all"):
                row = rows.setdefault(key, {"documents": 0, "characters": 0, "bytes": 0})
                row["documents"] += 1
                row["characters"] += len(doc.text)
                row["bytes"] += len(doc.text.encode("utf-8"))
        stats[name] = dict(sorted(rows.items()))
    return stats
