"""`densessm serve` against bad input: requests that once reached the tokenizer or the model wrongly (a lone
surrogate, booleans read as token ids, a body sent as text/plain) are 400/415 answers in OpenAI's format naming
the parameter; a tokenizer that does not fit the model is blamed on the server; at start, a tokenizer with
custom code or a model directory without one is one line, and Ctrl-C while loading is exit 130.

The requests go through the whole FastAPI application in this process (routing, dependencies, validation,
error handlers) with a running engine, so no server process has to start; tests/test_serve_http.py drives
real server processes."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from test_serve_engine import reference, submit, wait
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import densessm.loading
import densessm.serving.cli
from densessm import DenseRetNetForCausalLM
from densessm.cli import main
from densessm.inference import Int8Linear
from densessm.serving.app import ServerSettings, create_app
from densessm.serving.engine import Engine, EngineConfig
from densessm.serving.metrics import ServerMetrics

VOCAB = 97  # tiny_config's vocab_size


def word_tokenizer(words: int) -> PreTrainedTokenizerFast:
    """``<pad> <s> </s> <unk>`` and ``w0``... : ``words`` tokens in all."""
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(words - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class App:
    """The server's application over a running engine, called directly as ASGI."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        torch.manual_seed(0)
        model = DenseRetNetForCausalLM(tiny_config()).eval()
        metrics = ServerMetrics(2)
        config = EngineConfig(max_batch=2, max_queue=4, prefill_chunk=8, prefix_cache_bytes=0, max_model_len=64)
        self.engine = Engine(model, copy.deepcopy(tokenizer), config, metrics)
        settings = ServerSettings(model_name="tiny", max_model_len=64, max_prompt_tokens=63, max_tokens=8, max_n=2)
        self.app = create_app(self.engine, tokenizer, settings, metrics)
        self.engine.start()

    def post(
        self, path: str, body: bytes | dict, content_type: str | None = "application/json", extra: tuple = ()
    ) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = [(b"content-length", str(len(raw)).encode()), *extra]
        if content_type is not None:
            headers.append((b"content-type", content_type.encode("latin-1")))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        sent: list[dict] = []

        async def call() -> None:
            delivered = False

            async def receive() -> dict:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                await asyncio.Event().wait()  # the client stays connected

            async def send(message: dict) -> None:
                sent.append(message)

            await self.app(scope, receive, send)

        asyncio.run(call())
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.fixture(scope="module")
def app():
    running = App(word_tokenizer(VOCAB))
    yield running
    running.engine.stop()


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "w1 w2", "max_tokens": 2, "temperature": 0, **fields}


def chat(message: dict, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", **message}], "max_tokens": 2, **fields}


def raw(text: str) -> bytes:
    """A body with JSON escapes kept as written (json.dumps would refuse to write a lone surrogate)."""
    return text.encode()


SURROGATE = (
    "holds a lone surrogate \\ud800 at character {}: not valid Unicode text (send the character's UTF-8, or its "
    "surrogate pair)"
)

REFUSED = [
    # (id, endpoint, body, status, param, message)
    # a lone surrogate, valid JSON, anywhere it could reach the tokenizer (or the answer's encoding)
    (
        "prompt-surrogate",
        "/v1/completions",
        raw('{"model": "tiny", "prompt": "w1 \\ud800 w2"}'),
        400,
        "prompt",
        "invalid 'prompt': the text " + SURROGATE.format(3),
    ),
    (
        "prompt-list-surrogate",
        "/v1/completions",
        raw('{"model": "tiny", "prompt": ["w1", "w2 \\udfff"]}'),
        400,
        "prompt",
        "invalid 'prompt': prompt[1] " + SURROGATE.replace("ud800", "udfff").format(3),
    ),
    (
        "chat-content-surrogate",
        "/v1/chat/completions",
        raw('{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        400,
        "messages.0.content",
        "invalid 'messages.0.content': the text " + SURROGATE.format(0),
    ),
    (
        "chat-part-surrogate",
        "/v1/chat/completions",
        raw('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "w1\\ud800"}]}]}'),
        400,
        "messages.0.content.0.text",
        "invalid 'messages.0.content.0.text': the text " + SURROGATE.format(2),
    ),
    (
        "chat-name-surrogate",
        "/v1/chat/completions",
        raw('{"model": "tiny", "messages": [{"role": "user", "content": "w1", "name": "\\ud800"}]}'),
        400,
        "messages.0.name",
        "invalid 'messages.0.name': the text " + SURROGATE.format(0),
    ),
    (
        "stop-surrogate",
        "/v1/completions",
        raw('{"model": "tiny", "prompt": "w1", "stop": ["w2", "\\ud800"]}'),
        400,
        "stop.1",
        "invalid 'stop.1': the text " + SURROGATE.format(0),
    ),
    (
        "model-surrogate",
        "/v1/completions",
        raw('{"model": "tiny\\ud800", "prompt": "w1"}'),
        400,
        "model",
        "invalid 'model': the text " + SURROGATE.format(4),
    ),
    (
        "key-surrogate",
        "/v1/completions",
        raw('{"model": "tiny", "prompt": "w1", "\\ud800": 1}'),
        400,
        None,
        "a parameter name is not valid Unicode text (it holds a lone surrogate)",
    ),
    # token ids: integers only, inside the vocabulary, at every nesting
    (
        "bool-ids",
        "/v1/completions",
        completion(prompt=[True, False, 7]),
        400,
        "prompt",
        "invalid 'prompt': prompt[0] is true: a token id is an integer",
    ),
    (
        "nested-bool-id",
        "/v1/completions",
        completion(prompt=[[5, 6], [7, False]]),
        400,
        "prompt",
        "invalid 'prompt': prompt[1][1] is false: a token id is an integer",
    ),
    (
        "float-id",
        "/v1/completions",
        completion(prompt=[5, 6.0]),
        400,
        "prompt",
        "invalid 'prompt': prompt[1] is 6.0: a token id is an integer",
    ),
    (
        "null-id",
        "/v1/completions",
        completion(prompt=[5, None]),
        400,
        "prompt",
        "invalid 'prompt': prompt[1] is null: a token id is an integer",
    ),
    (
        "too-deep",
        "/v1/completions",
        completion(prompt=[[[5]]]),
        400,
        "prompt",
        "invalid 'prompt': prompt[0][0] is [5]: a token id is an integer",
    ),
    (
        "mixed-list",
        "/v1/completions",
        completion(prompt=[[5], "w1"]),
        400,
        "prompt",
        "invalid 'prompt': prompt[1] is \"w1\" but prompt[0] is [5]: a list holds only strings, only token ids, "
        "or only lists of token ids",
    ),
    (
        "empty-nested",
        "/v1/completions",
        completion(prompt=[[5], []]),
        400,
        "prompt",
        "invalid 'prompt': prompt[1] is an empty list of token ids",
    ),
    (
        "not-a-prompt",
        "/v1/completions",
        completion(prompt={"text": "w1"}),
        400,
        "prompt",
        "invalid 'prompt': expected a string, a list of strings, a list of token ids or a list of lists of them, "
        'got {"text": "w1"}',
    ),
    (
        "negative-id",
        "/v1/completions",
        completion(prompt=[5, -1]),
        400,
        "prompt",
        f"token id -1 is out of range for the model's vocabulary of {VOCAB}",
    ),
    (
        "nested-negative-id",
        "/v1/completions",
        completion(prompt=[[5], [6, -3]]),
        400,
        "prompt",
        f"token id -3 is out of range for the model's vocabulary of {VOCAB}",
    ),
    (
        "nested-id-beyond",
        "/v1/completions",
        completion(prompt=[[5], [VOCAB]]),
        400,
        "prompt",
        f"token id {VOCAB} is out of range for the model's vocabulary of {VOCAB}",
    ),
    (
        "bias-bool",
        "/v1/completions",
        completion(logit_bias={"5": True}),
        400,
        "logit_bias.5",
        "invalid 'logit_bias.5': expected a number, got true",
    ),
    (
        "bias-non-ascii-digit",
        "/v1/completions",
        completion(logit_bias={"\u0663": 1}),  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        400,
        "logit_bias",
        "invalid 'logit_bias': keys must be token ids (integers as strings), got \"\\u0663\"",
    ),
    (
        "bias-negative",
        "/v1/completions",
        completion(logit_bias={"-1": 1}),  # an integer as a string, but no token id
        400,
        "logit_bias",
        "invalid 'logit_bias': keys must be token ids, which are >= 0, got \"-1\"",
    ),
    (
        "bias-superscript",
        "/v1/completions",
        completion(logit_bias={"\u00b2": 1}),  # str.isdigit, but not for int()
        400,
        "logit_bias",
        "invalid 'logit_bias': keys must be token ids (integers as strings), got \"\\u00b2\"",
    ),
    (
        "bias-leading-zero",
        "/v1/completions",
        completion(logit_bias={"7": 100, "07": -100}),  # both were token 7: the last one won
        400,
        "logit_bias",
        "invalid 'logit_bias': keys must be token ids without leading zeros, got \"07\"",
    ),
    (
        "bias-huge-key",
        "/v1/completions",
        completion(logit_bias={"9" * 5000: 1}),  # int() refuses over 4300 digits
        400,
        "logit_bias",
        "invalid 'logit_bias': token id 999999999999... is out of any vocabulary's range",
    ),
    # booleans are not numbers anywhere
    (
        "max-tokens-bool",
        "/v1/completions",
        completion(max_tokens=True),
        400,
        "max_tokens",
        "invalid 'max_tokens': expected a number, got true",
    ),
    ("n-bool", "/v1/completions", completion(n=True), 400, "n", "invalid 'n': expected a number, got true"),
    (
        "temperature-bool",
        "/v1/chat/completions",
        chat({"content": "w1"}, temperature=False),
        400,
        "temperature",
        "invalid 'temperature': expected a number, got false",
    ),
    # NaN and Infinity, which Python's JSON parser reads, were blamed on the range ("greater than or equal to 0")
    (
        "temperature-nan",
        "/v1/chat/completions",
        chat({"content": "w1"}, temperature=float("nan")),
        400,
        "temperature",
        "invalid 'temperature': expected a finite number, got NaN",
    ),
    (
        "logit-bias-inf",
        "/v1/completions",
        completion(logit_bias={"5": float("-inf")}),
        400,
        "logit_bias.5",
        "invalid 'logit_bias.5': expected a finite number, got -Infinity",
    ),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "param", "message"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_bad_values_are_refused_naming_the_parameter(app, endpoint, body, status, param, message):
    code, answer = app.post(endpoint, body)
    assert code == status, answer
    assert answer["error"]["message"] == message
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_valid_text_and_ids_around_the_refusals_are_answered(app):
    """What the checks must let through: a surrogate pair (one character), an id at the vocabulary's end,
    lists of lists, integral numbers written as 2.0 for a count."""
    for endpoint, body in (
        ("/v1/completions", raw('{"model": "tiny", "prompt": "w1 \\ud83d\\ude00", "max_tokens": 2}')),
        ("/v1/completions", completion(prompt=[[5, VOCAB - 1], [6]])),
        ("/v1/completions", completion(prompt=[0, 5], max_tokens=2.0)),
        ("/v1/chat/completions", chat({"content": [{"type": "text", "text": "w1 \u00e9"}]}, stop=["w2"])),
    ):
        code, answer = app.post(endpoint, body)
        assert code == 200, answer
        assert answer["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/plain", "Content-Type: text/plain"),
        ("application/x-www-form-urlencoded", "Content-Type: application/x-www-form-urlencoded"),
        (None, "no Content-Type"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_json_body_under_another_content_type_is_named_as_such(app, endpoint, content_type, shown):
    body = completion() if endpoint == "/v1/completions" else chat({"content": "w1"})
    code, answer = app.post(endpoint, body, content_type=content_type)
    assert code == 415
    assert answer["error"] == {
        "message": "the request body must be JSON, sent with the header 'Content-Type: application/json' "
        f"(this one came with {shown})",
        "type": "invalid_request_error",
        "param": None,
        "code": "unsupported_media_type",
    }


def test_a_compressed_body_is_named_by_its_content_encoding(app):
    """The header was ignored: the gzip bytes were read as JSON and blamed as invalid UTF-8 at offset 1."""
    body = gzip.compress(json.dumps(completion()).encode())
    code, answer = app.post("/v1/completions", body, extra=((b"content-encoding", b"gzip"),))
    assert code == 415 and answer["error"]["message"].startswith(
        "the request body is sent with 'Content-Encoding: gzip', which this server does not decode"
    )
    assert app.post("/v1/completions", completion(), extra=((b"content-encoding", b"identity"),))[0] == 200


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_with_parameters_or_suffix_are_read(app, content_type):
    code, answer = app.post("/v1/completions", completion(), content_type=content_type)
    assert code == 200, answer


def test_a_body_that_is_json_but_not_an_object_is_still_named_so(app):
    assert app.post("/v1/completions", b"[1, 2]")[1]["error"]["message"] == "the request body must be a JSON object"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_not_utf8_is_named_so_with_the_byte_offset(app, endpoint):
    body = b'{"model": "tiny", "prompt": "w1 \xff\xfe"}'
    code, answer = app.post(endpoint, body)
    assert code == 400
    assert answer["error"] == {
        "message": "the request body is not valid UTF-8 JSON: byte 0xff at offset 32 (invalid start byte); send "
        "JSON encoded as UTF-8",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"model": "tiny", "prompt": "w1", "max_tokens": ' + b"9" * 5000 + b"}",
            "the request body holds an integer of more than 4300 digits; no field of this API takes one",
        ),
        (
            b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "the request body nests arrays or objects too deeply to parse; no field of this API needs that depth",
        ),
    ],
)
def test_json_the_decoder_gives_up_on_is_named(app, body, message):
    code, answer = app.post("/v1/completions", body)
    assert code == 400 and answer["error"]["message"] == message


def test_content_parts_other_than_text_are_named(app):
    """An image part was answered "messages.0.content: Input should be a valid string"."""
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    code, answer = app.post("/v1/chat/completions", chat({"content": [{"type": "text", "text": "w1"}, image]}))
    assert code == 400
    assert answer["error"]["message"] == (
        "invalid 'messages.0.content.1': content parts of type \"image_url\" are not supported: this model reads "
        "text only"
    )
    code, answer = app.post("/v1/chat/completions", chat({"content": [{"type": "text", "text": "w1"}]}))
    assert code == 200, answer


@pytest.mark.parametrize(
    ("part", "message", "code"),
    [
        ({"type": "text"}, "missing required parameter 'messages.0.content.0.text'", "missing_required_parameter"),
        ({"text": "w1"}, "missing required parameter 'messages.0.content.0.type'", "missing_required_parameter"),
        ({"type": "text", "text": 5}, "invalid 'messages.0.content.0.text': Input should be a valid string", None),
    ],
)
def test_a_text_part_with_a_missing_or_wrong_field_names_that_field(app, part, message, code):
    """A part without its text was blamed on the message content as "Input should be a valid string"."""
    status, answer = app.post("/v1/chat/completions", chat({"content": [part]}))
    assert status == 400 and answer["error"]["message"] == message
    assert answer["error"]["code"] == (code or "invalid_value")


@pytest.mark.parametrize(
    ("endpoint", "raw", "key"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": "w1", "max_tokens": 2, "max_tokens": 9}', "max_tokens"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "w1", "role": "system"}]}',
            "role",
        ),
    ],
)
def test_a_key_given_twice_in_one_object_is_refused(app, endpoint, raw, key):
    """Python's parser kept the last value without a word; a proxy or another client library may read the first."""
    code, answer = app.post(endpoint, raw)
    assert code == 400
    assert answer["error"]["message"] == (
        f"the request body gives the key '{key}' twice in one object: send each parameter once"
    )
    assert answer["error"]["param"] == key


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_an_empty_body_is_named_as_such(app, endpoint):
    code, answer = app.post(endpoint, b"")
    assert code == 400
    assert answer["error"] == {
        "message": "the request body is empty: send the request's parameters as a JSON object",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_a_tokenizer_larger_than_the_model_is_the_servers_fault():
    """Text whose tokens lie beyond the model's vocabulary: the server's tokenizer does not fit its model. The
    client is not told that its prompt is wrong (a 400 about 'token id 110')."""
    served = App(word_tokenizer(VOCAB + 20))
    try:
        for endpoint, body in (
            ("/v1/completions", completion(prompt="w1 w110")),
            ("/v1/chat/completions", chat({"content": "w1 w110"})),
        ):
            code, answer = served.post(endpoint, body)
            assert code == 500
            assert answer["error"]["type"] == "server_error"
            assert answer["error"]["message"] == (
                f"the server's tokenizer gives token id 114, beyond the model's vocabulary of {VOCAB}: the server "
                "runs with a tokenizer that does not fit its model (densessm serve --tokenizer DIR)"
            )
        assert served.post("/v1/completions", completion(prompt="w1 w2"))[0] == 200
    finally:
        served.engine.stop()


# --- start-up -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("serve-robust") / "tiny"
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(directory)
    word_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def test_a_tokenizer_larger_than_the_vocabulary_is_said_at_start(model_dir, tmp_path, caplog, monkeypatch):
    """The server starts (prompts within the vocabulary are served), but said nothing until a request failed."""

    class Started(Exception):
        pass

    word_tokenizer(VOCAB + 20).save_pretrained(tmp_path / "larger")

    def bind(host, port):
        raise Started

    monkeypatch.setattr(densessm.serving.cli, "_bind", bind)
    with caplog.at_level("WARNING"):
        main(["serve", str(model_dir), "--port", "0", "--tokenizer", str(tmp_path / "larger")])
    assert f"the tokenizer has {VOCAB + 20} tokens, beyond the model's vocabulary of {VOCAB}: prompts" in caplog.text


def test_a_tokenizer_with_custom_code_is_refused_without_asking(model_dir, tmp_path, capsys, monkeypatch):
    """transformers would print 'Do you wish to run the custom code? [y/N]' and read the terminal."""
    tokenizer_dir = tmp_path / "custom"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_dir / name).write_bytes((model_dir / name).read_bytes())
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    settings |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    ran = tmp_path / "the-custom-code-ran"
    (tokenizer_dir / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal"))
    assert main(["serve", str(model_dir), "--tokenizer", str(tokenizer_dir), "--port", "0"]) == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        f"densessm serve: error: the tokenizer in {tokenizer_dir} needs its own Python code (tokenizer_config.json "
        "has an auto_map); densessm never runs code from a model or tokenizer directory: use a tokenizer without "
        "custom code"
    )
    assert "[y/N]" not in out + err and "trust_remote_code" not in out + err
    assert not ran.exists()


def test_a_model_directory_without_tokenizer_files_is_one_line(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    assert main(["serve", str(bare), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"densessm serve: error: {bare} has no tokenizer (tokenizer.json / tokenizer.model / vocab.json): save it "
        "next to the model with tokenizer.save_pretrained(DIR), or name a tokenizer directory"
    )
    assert not any("sentencepiece" in line for line in err)


@pytest.mark.parametrize("stage", ["load_tokenizer_dir", "load_causal_lm"])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(model_dir, capsys, monkeypatch, stage):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(densessm.serving.cli, stage, interrupted)
    monkeypatch.setattr(densessm.serving.cli, "_serve", lambda *a: pytest.fail(f"served: {stage} was not called"))
    assert main(["serve", str(model_dir), "--port", "0"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "densessm serve: interrupted"


def test_a_model_directory_that_does_not_match_its_config_is_refused(model_dir, tmp_path, capsys):
    """The strict loader of `generate` and `eval`: no server with half-random weights."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in model_dir.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps(config | {"vocab_size": VOCAB + 3}))
    assert main(["serve", str(damaged), "--port", "0"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"densessm serve: error: {damaged} does not hold the model its config.json describes (dense_retnet): "
        "tensors of another shape: "
    )
    assert f"({VOCAB}, " in line and f"(config.json gives ({VOCAB + 3}, " in line


def test_a_model_directory_with_integer_weights_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    """An int8 tensor cast into a float parameter would serve a model of zeros."""
    monkeypatch.setattr(densessm.serving.cli, "_serve", lambda *a: pytest.fail("served a model of zeros"))
    damaged = tmp_path / "int8"
    damaged.mkdir()
    for path in model_dir.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int8)
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    assert main(["serve", str(damaged), "--port", "0"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"densessm serve: error: {damaged} does not hold the model its config.json describes (dense_retnet): "
        "tensors of another kind: model.embed_tokens.weight stored as I8 (the model holds floating-point values "
        "there)"
    )


UNSENDABLE_KEYS = [("abc\n", "'\\n'"), ("abc ", "whitespace at an end"), ("ключ", "'к', 'л', 'ч', 'ю'")]
"""API keys no client can send (a header carries printable ASCII without spaces), and how the refusal shows them."""


def _unsendable_key(shown: str) -> str:
    return (
        f"the API key (--api-key or $DENSESSM_API_KEY) holds {shown}: a client's 'Authorization: Bearer KEY' header "
        "carries printable ASCII without outer whitespace, so no request could match it; use such a key (a trailing "
        "newline or space from a file is the usual cause)"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--served-model-name", ""],
            "--served-model-name is empty: name the model as clients will ask for it, or drop the flag",
        ),
        (
            ["--served-model-name", "  "],
            "--served-model-name is empty: name the model as clients will ask for it, or drop the flag",
        ),
        (
            ["--max-request-bytes", "0"],
            "--max-request-bytes must be at least 1 byte, got 0: every request would be refused",
        ),
        (
            ["--quantize", "int8", "--dtype", "bfloat16"],
            "--quantize int8: int8 weights compute in float32, not in bfloat16 (use --device cpu --dtype float32, "
            "or drop --quantize)",
        ),
        (["--quantize", "int8", "--compile"], "--quantize int8 cannot be compiled: drop --compile or --quantize"),
        (["--shutdown-timeout", "nan"], "argument --shutdown-timeout: expected a finite number, got 'nan'"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0, got -1.0"),
        *((["--api-key", key], _unsendable_key(shown)) for key, shown in UNSENDABLE_KEYS),
    ],
)
def test_values_that_cannot_work_are_refused_before_loading(model_dir, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(densessm.serving.cli, "load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["serve", str(model_dir), "--port", "0", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"densessm serve: error: {message}"


def test_quantize_is_refused_on_a_gpu(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(densessm.serving.cli, "load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["serve", str(model_dir), "--port", "0", "--quantize", "int8", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "densessm serve: error: --quantize int8: int8 weights run on the CPU only, not on cuda (use --device cpu "
        "--dtype float32, or drop --quantize)"
    )


def test_quantize_int8_serves_int8_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    directory = tmp_path / "wide"  # its fused projections pass quantize_int8's default min_weight
    DenseRetNetForCausalLM(tiny_config(hidden_size=128, query_key_dim=64)).save_pretrained(directory)
    word_tokenizer(VOCAB).save_pretrained(directory)
    served = []

    def serve(server, sock, engine, shutdown_timeout) -> None:
        sock.close()
        served.append(engine)

    monkeypatch.setattr(densessm.serving.cli, "_serve", serve)
    assert main(["serve", str(directory), "--port", "0", "--quantize", "int8", "--max-batch", "2"]) == 0
    [engine] = served
    model = engine.model
    retention = model.model.layers[0].retention
    assert isinstance(retention.projection, Int8Linear) and isinstance(retention.o_proj, Int8Linear)
    engine.start()
    try:
        prompt = [5, 17, 33, 8]
        result = wait(submit(engine, prompt, max_tokens=6)[1])
        assert result["tokens"][0] == reference(model, prompt, 6)  # what the int8 model itself generates
    finally:
        engine.stop()


BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content.nope.deeper }}{% endfor %}"
STRICT_TEMPLATE = (  # refuses a conversation without a system message first, on purpose
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)


def test_a_chat_template_that_renders_nothing_is_refused_at_start(word_tokenizer):
    """A broken template made every chat request a 400 that blamed the client's messages."""
    from densessm.serving.chat import ChatPrompt

    word_tokenizer.chat_template = BROKEN_TEMPLATE
    with pytest.raises(ValueError, match="the tokenizer's chat template renders no conversation .*UndefinedError"):
        ChatPrompt(word_tokenizer)
    word_tokenizer.chat_template = "{% for m in messages %}{% endfor %}"  # renders nothing, raises nothing
    with pytest.raises(ValueError, match="renders no conversation .it leaves the message out: ''."):
        ChatPrompt(word_tokenizer)
    word_tokenizer.chat_template = STRICT_TEMPLATE  # one of the plain conversations renders: it starts
    assert ChatPrompt(word_tokenizer).own_template


def test_an_api_key_with_an_inner_space_is_accepted(model_dir, monkeypatch, capsys):
    """A header keeps inner spaces: such a key can be sent, so it is not refused with the unsendable ones."""
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        raise ValueError("stopped after the checks")

    monkeypatch.setattr(densessm.serving.cli, "load_causal_lm", load)
    assert main(["serve", str(model_dir), "--port", "0", "--api-key", "a b"]) == 1
    assert loads and "API key" not in capsys.readouterr().err


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_budget_over_the_limit_names_the_field_the_client_sent(app, field):
    """``max_completion_tokens`` over --max-tokens was blamed on ``max_tokens``, which the client never sent."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w1"}], field: 9}
    code, answer = app.post("/v1/chat/completions", body)
    assert code == 400
    assert answer["error"]["message"] == f"{field} is 9; this server allows at most 8 (--max-tokens)"
    assert answer["error"]["param"] == field


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": "3"}, "invalid 'max_tokens': expected a number, got \"3\""),
        ({"temperature": "0.5"}, "invalid 'temperature': expected a number, got \"0.5\""),
        ({"stream": "yes"}, "invalid 'stream': Input should be a valid boolean"),
        ({"echo": 1}, "invalid 'echo': Input should be a valid boolean"),
    ],
)
def test_strings_for_numbers_and_numbers_for_booleans_are_refused(app, fields, message):
    """pydantic read "3" as 3 and "yes" or 1 as true, where OpenAI's API refuses them."""
    code, answer = app.post("/v1/completions", completion(**fields))
    assert code == 400 and answer["error"]["message"] == message


@pytest.mark.parametrize("given", [{"max_tokens": None}, {}])
def test_a_completion_without_max_tokens_takes_the_default_within_the_servers_limit(app, given):
    """null gave as many tokens as the server allows while an absent key gave 16 (OpenAI's default for both);
    above the server's own limit the default was refused, blaming max_tokens, which the client never sent."""
    body = {k: v for k, v in completion().items() if k != "max_tokens"} | given
    code, answer = app.post("/v1/completions", body)
    assert code == 200, answer
    assert answer["usage"]["completion_tokens"] <= 8  # this server allows 8 (--max-tokens); the default is 16
