"""Generated tokens to streamed text: pieces add up to the decoded whole, stop sequences never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

import densessm
from densessm.serving.text import TextStream

BUNDLED = Path(densessm.__file__).parent / "resources" / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe():
    """The bundled byte-level BPE: characters outside ASCII take several tokens."""
    return PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED))


def stream_all(tokenizer, ids, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_pieces_add_up_to_the_decoded_text(bpe):
    text = "Größe: 12 €, naïve café — 東京 🚀 done."
    ids = bpe(text)["input_ids"]
    pieces, _ = stream_all(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


def test_stop_sequence_is_cut_with_what_follows(bpe):
    ids = bpe("The answer is 42. END of story")["input_ids"]
    pieces, stream = stream_all(bpe, ids, stop=(" END",))
    assert "".join(pieces) == "The answer is 42."
    assert stream.stopped


def test_a_possible_stop_is_held_back_until_it_is_not_one(word_tokenizer):
    stream = TextStream(word_tokenizer, stop=(" w2 w3",))
    assert stream.push(word_tokenizer.convert_tokens_to_ids("w1")) == "w1"
    assert stream.push(word_tokenizer.convert_tokens_to_ids("w2")) == ""  # " w2" may begin the stop
    assert stream.push(word_tokenizer.convert_tokens_to_ids("w4")) == " w2 w4"
    assert not stream.stopped


def test_earliest_of_several_stops_wins(word_tokenizer):
    ids = word_tokenizer("w1 w2 w3 w4")["input_ids"]
    pieces, stream = stream_all(word_tokenizer, ids, stop=("w4", "w2"))
    assert "".join(pieces) == "w1 " and stream.stopped


def test_text_after_a_stop_is_refused(word_tokenizer):
    stream = TextStream(word_tokenizer, stop=("w1",))
    stream.push(word_tokenizer.convert_tokens_to_ids("w1"))
    with pytest.raises(RuntimeError, match="already ended"):
        stream.push(word_tokenizer.convert_tokens_to_ids("w2"))
