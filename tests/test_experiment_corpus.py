"""The experiment corpus pipeline after the download: extraction, filtering, dedup and the seeded split."""

from __future__ import annotations

import json

from densessm_lab.experiments.corpus import (
    SPLITS,
    Document,
    html_to_text,
    normalise,
    pod_to_text,
    prepare,
    split_documents,
    split_stats,
    strip_brown_tags,
    to_jsonl,
)


def _docs(n: int, sources: tuple[str, ...] = ("a", "b")) -> list[Document]:
    return [Document(s, f"{i:03d}", f"{s} document {i} " + "word " * 60) for s in sources for i in range(n)]


def test_split_is_deterministic_and_depends_on_seed(tmp_path):
    docs = prepare(_docs(40)).documents
    first = split_documents(docs, seed=0)
    again = split_documents(list(reversed(docs)), seed=0)
    assert first == again
    (tmp_path / "a.jsonl").write_text(to_jsonl(first["train"]))
    (tmp_path / "b.jsonl").write_text(to_jsonl(again["train"]))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    other = split_documents(docs, seed=1)
    assert [d.doc_id for d in other["test"]] != [d.doc_id for d in first["test"]]


def test_split_is_by_document_and_covers_every_source():
    docs = prepare(_docs(40)).documents
    splits = split_documents(docs, seed=3)
    keys = {name: {(d.source, d.doc_id) for d in splits[name]} for name in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(k) for k in keys.values()) == len(docs)
    for name in ("validation", "test"):
        assert {d.source for d in splits[name]} == {"a", "b"}
        assert len(splits[name]) == 4  # round(40 * 0.05) = 2 per source
    stats = split_stats(splits)
    assert stats["train"]["all"]["documents"] == 72
    assert stats["test"]["a"]["characters"] == sum(len(d.text) for d in splits["test"] if d.source == "a")


def test_exact_duplicates_removed_after_normalisation():
    body = "Same text. " * 30
    docs = [
        Document("x", "1", body),
        Document("x", "2", body.rstrip() + "\n\n\n"),  # differs only in trailing blanks/lines
        Document("y", "1", body.rstrip() + "  \r\n"),
        Document("x", "3", "Different. " * 30),
    ]
    prepared = prepare(docs)
    assert [(d.source, d.doc_id) for d in prepared.documents] == [("x", "1"), ("x", "3")]
    assert prepared.dropped_duplicate == {"x": 1, "y": 1}


def test_short_documents_dropped():
    prepared = prepare([Document("s", "short", "too short " * 5), Document("s", "long", "long enough " * 30)])
    assert [d.doc_id for d in prepared.documents] == ["long"]
    assert prepared.dropped_short == {"s": 1}


def test_normalise_keeps_indentation_and_collapses_blank_runs():
    assert normalise("a  \r\n\n\n\n\tcode()\n\n") == "a\n\n    code()"


def test_brown_tags_stripped():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc 1/2/cd of/in it/pps "
        "did/dod n't/* ./.\n\n\n\tIt's/pps+bez over/rp ./.\n"
    )
    assert strip_brown_tags(tagged) == "The jury said \"no evidence\", and 1/2 of it didn't.\n\nIt's over."


def test_pod_and_html_extraction():
    pod = "=head1 NAME\n\nperlfoo - B<bold> and L<the docs|perlfunc> E<gt> C<< $a->b >>\n\n=cut\n"
    assert normalise(pod_to_text(pod)) == "NAME\n\nperlfoo - bold and the docs > $a->b"
    html = (
        '<html><head><meta charset="utf-8" /><title>T</title></head><body>'
        '<div class="navheader">Prev Up Next</div><h2>Title</h2><p>Some   <b>bold</b>\ntext &amp; more.</p>'
        "<pre>  x = 1\n  y = 2</pre></body></html>"
    )
    assert normalise(html_to_text(html)) == "Title\n\nSome bold text & more.\n\n  x = 1\n  y = 2"


def test_jsonl_lines_have_text_and_source():
    line = to_jsonl([Document("s", "1", "héllo")])
    assert json.loads(line) == {"source": "s", "text": "héllo"}
    assert line.endswith("\n") and "é" in line
