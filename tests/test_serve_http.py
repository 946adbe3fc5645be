"""`densessm serve` as a user meets it: a real server process on a free port, driven by the official `openai`
client (and raw HTTP for what a client library would not send). Greedy output equals model.generate, alone
or among 16 concurrent clients; the prompt cache answers as a cold read does; bad requests get the
documented errors; a client that leaves frees its slot; the queue pushes back; SIGTERM drains."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from transformers import SequenceBiasLogitsProcessor

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.cli import main

KEY = "test-key"
EOS = 2
NO_EOS = {"2": -100}


class Server:
    """A `densessm serve` subprocess; its log is kept (and shown when a test fails)."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "densessm.cli", "serve", str(model_dir), "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self.log: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.log.append(line)
                if line.startswith("densessm serve: ") and " at http://" in line:
                    self.url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def post(self, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def save(model, directory: Path, tokenizer) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(93)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def retnet(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    return model, save(model, tmp_path_factory.mktemp("serve") / "tiny-retnet", tokenizer)


@pytest.fixture(scope="module")
def server(retnet):
    """The shared server: an API key, a 4-row batch (16 clients queue), 8-token prompt slices."""
    running = Server(retnet[1], "--max-batch", "4", "--prefill-chunk", "8", env={"DENSESSM_API_KEY": KEY})
    yield running
    running.stop()


def generate(model, ids: list[int], max_tokens: int, ban_eos: bool = False) -> list[int]:
    processors = [SequenceBiasLogitsProcessor({(EOS,): -100.0})] if ban_eos else []
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, logits_processor=processors
        )
    return out[0, len(ids) :].tolist()


def words(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def metric(server: Server, name: str) -> float:
    for line in server.get("/metrics")[1].splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def prompt_text(seed: int, length: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 93, (length,), generator=g))


# --- exactness ------------------------------------------------------------------------------------------------


def test_completion_equals_generate_streamed_or_not(server, retnet, tokenizer):
    model = retnet[0]
    client = server.client()
    prompt = "w5 w17 w3 w60 w2x w41"
    expected = generate(model, tokenizer(prompt)["input_ids"], 12)
    whole = client.completions.create(model="tiny-retnet", prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == words(tokenizer, expected)
    assert whole.usage.prompt_tokens == 6 and whole.usage.completion_tokens == len(expected)
    pieces = client.completions.create(model="tiny-retnet", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == words(tokenizer, expected)
    assert chunks[-1].choices[0].finish_reason == ("stop" if EOS in expected else "length")


def test_chat_equals_generate_on_the_plain_template(server, retnet, tokenizer):
    model = retnet[0]
    client = server.client()
    messages = [{"role": "system", "content": "w1 w2 w3"}, {"role": "user", "content": "w9 w8"}]
    rendered = "system: w1 w2 w3\nuser: w9 w8\nassistant:"
    expected = words(tokenizer, generate(model, tokenizer(rendered)["input_ids"], 10))
    reply = client.chat.completions.create(model="tiny-retnet", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="tiny-retnet",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.prompt_tokens == len(tokenizer(rendered)["input_ids"])


def test_sixteen_concurrent_clients_get_what_they_get_alone(server, retnet, tokenizer):
    model = retnet[0]
    prompts = [prompt_text(seed, 1 + seed * 2) for seed in range(16)]  # 1 to 31 tokens: 1 to 4 slices
    expected = [words(tokenizer, generate(model, tokenizer(p)["input_ids"], 8, ban_eos=True)) for p in prompts]

    def ask(i: int) -> str:
        client = server.client()
        args = dict(model="tiny-retnet", prompt=prompts[i], max_tokens=8, temperature=0, logit_bias=NO_EOS)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
        return client.completions.create(**args).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected


def test_prefix_cache_hit_answers_as_a_cold_read(server, retnet, tokenizer):
    model = retnet[0]
    client = server.client()
    shared = prompt_text(100, 20)
    first, second = f"{shared} w1 w2 w3", f"{shared} w4 w5"
    client.completions.create(model="tiny-retnet", prompt=first, max_tokens=2, temperature=0)
    hit = client.completions.create(model="tiny-retnet", prompt=second, max_tokens=8, temperature=0, logprobs=2)
    assert hit.usage.prompt_tokens_details.cached_tokens == 16  # two 8-token blocks of the shared words
    assert hit.choices[0].text == words(tokenizer, generate(model, tokenizer(second)["input_ids"], 8))
    assert metric(server, "densessm_prefix_cache_hits_total") >= 1


def test_a_shared_system_prompt_is_read_once(server, retnet, tokenizer):
    """The second chat with the same 12-word system message continues from the state at its end."""
    client = server.client()
    system = {"role": "system", "content": prompt_text(200, 12)}
    for question in ("w1 w2", "w3 w4 w5"):
        messages = [system, {"role": "user", "content": question}]
        reply = client.chat.completions.create(model="tiny-retnet", messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == 13  # "system:" and the 12 words
    rendered = f"system: {system['content']}\nuser: w3 w4 w5\nassistant:"
    assert reply.choices[0].message.content == words(
        tokenizer, generate(retnet[0], tokenizer(rendered)["input_ids"], 4)
    )


def test_client_that_disconnects_frees_its_slot(server):
    client = server.client()
    cancelled = metric(server, "densessm_requests_cancelled_total")
    stream = client.completions.create(
        model="tiny-retnet", prompt="w1 w2", max_tokens=1000, temperature=0, logit_bias=NO_EOS, stream=True
    )
    next(iter(stream))
    stream.close()
    # both are awaited: the first token reaches the client just before its row joins the batch, so "no row
    # running" alone may be seen before the request ever ran in it
    await_cancelled(server, cancelled, "the departed client was not cancelled, or its slot not freed")


def await_cancelled(server: Server, before: float, why: str) -> None:
    """Wait until one more request was cancelled and no row runs (at most 20 s)."""
    deadline = time.monotonic() + 20
    while not (
        metric(server, "densessm_requests_cancelled_total") == before + 1
        and json.loads(server.get("/health")[1])["running"] == 0
    ):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_a_client_that_leaves_before_its_whole_answer_is_cancelled_while_tokens_still_come(server):
    """A request waiting for its whole answer was checked for a departed client only when no event had come for
    a while: a busy batch kept its rows generating to max_tokens for no one."""
    cancelled = metric(server, "densessm_requests_cancelled_total")
    host, port = server.url.removeprefix("http://").split(":")
    body = {"model": "tiny-retnet", "prompt": "w1 w2", "max_tokens": 1000, "n": 4, "temperature": 0}
    body["logit_bias"] = NO_EOS
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    deadline = time.monotonic() + 20
    while json.loads(server.get("/health")[1])["running"] == 0:  # its rows generate: tokens are coming
        assert time.monotonic() < deadline
        time.sleep(0.01)
    connection.close()  # gone before the answer (4,000 tokens take longer than noticing it: a quarter second)
    await_cancelled(server, cancelled, "the departed client was not cancelled while its rows generated")


# --- the API around it ------------------------------------------------------------------------------------------


def test_models_health_and_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-retnet"]
    assert client.models.retrieve("tiny-retnet").owned_by == "densessm"
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    client.completions.create(model="tiny-retnet", prompt="w3", max_tokens=2, temperature=0)
    metrics = server.get("/metrics")[1]
    for name in (
        'densessm_requests_total{endpoint="/v1/completions",status="200"}',
        "densessm_prompt_tokens_total",
        "densessm_generation_tokens_total",
        "densessm_batch_occupancy_bucket",
        "densessm_queue_time_seconds_count",
        "densessm_time_to_first_token_seconds_count",
        "densessm_time_per_output_token_seconds_count",
        "densessm_prefix_cache_misses_total",
    ):
        assert name in metrics, name


def test_sampling_parameters_are_honoured(server):
    client = server.client()
    args = dict(model="tiny-retnet", prompt="w7 w8", max_tokens=8, temperature=0.9, top_p=0.8, seed=11, n=3)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    stopped = client.completions.create(model="tiny-retnet", prompt="w7 w8", max_tokens=8, temperature=0, stop=["w"])
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"
    forced = client.completions.create(
        model="tiny-retnet", prompt="w7", max_tokens=3, temperature=0, logit_bias={"50": 100}
    )
    assert forced.choices[0].text == "w46 w46 w46"  # id 50 is w46
    chat = client.chat.completions.create(
        model="tiny-retnet",
        messages=[{"role": "user", "content": "w1"}],
        max_completion_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


BAD_REQUESTS = [
    # (endpoint, body, status, message fragment)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "w1"}, 400, "missing required parameter 'model'"),
    ("/v1/completions", {"model": "tiny-retnet"}, 400, "missing required parameter 'prompt'"),
    ("/v1/completions", {"model": "other", "prompt": "w1"}, 404, "the model 'other' does not exist"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "temperature": 2.5}, 400, "'temperature'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "top_p": 0}, 400, "'top_p'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "max_tokens": 0}, 400, "'max_tokens'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "max_tokens": 5000}, 400, "at most 1024"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "n": 5}, 400, "at most 4 (--max-n)"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "logprobs": 6}, 400, "'logprobs'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "frobnicate": 1}, 400, "unsupported parameter"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": ""}, 400, "the prompt is empty"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": [5, 500]}, 400, "token id 500 is out of range"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": [True, False, 7]}, 400, "prompt[0] is true"),
    ("/v1/completions", b'{"model": "tiny-retnet", "prompt": "w1 \\ud800"}', 400, "lone surrogate \\ud800"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1 " * 2048}, 400, "at most 2047"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1 " * 2000, "max_tokens": 100}, 400, "context"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "logit_bias": {"x": 1}}, 400, "token ids"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "logit_bias": {"97": 1}}, 400, "outside"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "stream_options": {}}, 400, "stream=true"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "seed": 2**64}, 400, "'seed'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "seed": 2**32}, 400, "'seed'"),  # drew as seed 0
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "seed": -1}, 400, "'seed'"),
    ("/v1/completions", {"model": "tiny-retnet", "prompt": "w1", "seed": 2**32 - 1, "n": 2}, 400, "seed + n"),
    (
        "/v1/chat/completions",
        {"model": "tiny-retnet", "messages": [{"role": "user", "content": "w1 " * 2100}]},
        400,
        "at most 2047",
    ),
    ("/v1/chat/completions", {"model": "tiny-retnet", "messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": "tiny-retnet", "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    (
        "/v1/chat/completions",
        {"model": "tiny-retnet", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny-retnet", "messages": [{"role": "user", "content": "w1"}], "tools": []},
        400,
        "unsupported parameter 'tools'",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny-retnet", "messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2},
        400,
        "needs logprobs=true",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "tiny-retnet",
            "messages": [{"role": "user", "content": "w1"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, endpoint, body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, answer = server.post(endpoint, raw)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert message in answer["error"]["message"], answer


def test_api_key_size_limit_and_unknown_routes(server):
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        server.client(key="wrong").models.list()
    assert server.post("/v1/completions", b"{}", key=None)[0] == 401
    assert server.get("/health")[0] == 200  # open without a key
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/completions")  # a 1 GB body announced: refused before it is sent
    connection.putheader("Content-Length", str(10**9))
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.endheaders()
    response = connection.getresponse()
    assert (
        response.status == 413 and "larger than the server's limit" in json.loads(response.read())["error"]["message"]
    )
    connection.close()
    code, body = server.get("/v1/nothing")
    assert code == 404 and "no route GET /v1/nothing" in json.loads(body)["error"]["message"]


# --- limits, DenseMamba, shutdown ----------------------------------------------------------------------------------


def test_mamba_server_queue_pushback_and_graceful_shutdown(tmp_path, tokenizer):
    """One slot and one queue place: a third request gets 429 (until the first client leaves); SIGTERM lets
    the running stream finish before the process exits."""
    torch.manual_seed(0)
    model = DenseMambaForCausalLM(tiny_mamba_config(eos_token_id=EOS)).eval()
    directory = save(model, tmp_path / "tiny-mamba", tokenizer)
    # the hog below may run a million tokens (it is closed long before): it must still hold the slot when the
    # third request comes, however slowly a loaded machine gets there (8,000 once ran out first)
    server = Server(
        directory,
        *("--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "60"),
        *("--max-model-len", "1000001", "--max-tokens", "1000000"),
    )
    try:
        client = server.client(key=None)
        prompt = "w4 w8 w15 w16 w23 w42"
        expected = words(tokenizer, generate(model, tokenizer(prompt)["input_ids"], 10))
        assert (
            client.completions.create(model="tiny-mamba", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
            == expected
        )

        hog = client.completions.create(
            model="tiny-mamba", prompt="w1", max_tokens=1_000_000, temperature=0, logit_bias=NO_EOS, stream=True
        )
        next(iter(hog))
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                client.completions.create, model="tiny-mamba", prompt=prompt, max_tokens=10, temperature=0
            )
            deadline = time.monotonic() + 20
            while json.loads(server.get("/health")[1])["waiting"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(openai.RateLimitError, match="--max-queue 1"):
                client.completions.create(model="tiny-mamba", prompt="w2", max_tokens=2)
            hog.close()  # its slot goes to the waiting request
            assert waiting.result(timeout=30).choices[0].text == expected

        draining = client.completions.create(
            model="tiny-mamba", prompt="w3", max_tokens=600, temperature=0, logit_bias=NO_EOS, stream=True
        )
        chunks = iter(draining)
        received = [next(chunks)]
        server.proc.send_signal(signal.SIGTERM)
        received += list(chunks)
        assert sum(len(c.choices[0].text.split()) for c in received) == 600
        assert received[-1].choices[0].finish_reason == "length"
        server.proc.wait(30)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        server.stop()


def test_requests_still_running_at_the_shutdown_timeout_end_with_an_answer(retnet):
    """uvicorn cancelled them: a bare "Internal Server Error" for a request waiting for its whole answer, and a
    stream cut without an error event or [DONE]."""
    limits = ("--max-model-len", "1000001", "--max-tokens", "1000000")
    server = Server(retnet[1], "--max-batch", "2", "--shutdown-timeout", "1", *limits)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        headers = {"Content-Type": "application/json"}
        long = {"model": "tiny-retnet", "prompt": "w1", "max_tokens": 1_000_000, "temperature": 0}
        long["logit_bias"] = NO_EOS
        streaming = http.client.HTTPConnection(host, int(port), timeout=60)
        streaming.request("POST", "/v1/completions", json.dumps({**long, "stream": True}), headers)
        stream = streaming.getresponse()
        assert stream.readline().startswith(b"data: ")
        whole = http.client.HTTPConnection(host, int(port), timeout=60)
        whole.request("POST", "/v1/completions", json.dumps(long), headers)
        deadline = time.monotonic() + 20
        while json.loads(server.get("/health")[1])["running"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        answer = whole.getresponse()
        assert answer.status == 503 and "shutting down" in json.loads(answer.read())["error"]["message"]
        events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        assert server.proc.wait(30) is not None
    finally:
        server.stop()


# --- the command line before serving -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--max-n", "9", "--max-batch", "4"], 2, "--max-n 9 is more than --max-batch 4"),
        (["--port", "70000"], 2, "--port must be in 0..65535"),
        (["--max-prompt-tokens", "4096"], 2, "leaves no room to answer"),
        (["--device", "cuda:7"], 2, "--device cuda:7"),
        (["--host", "no.such.host.invalid"], 2, "--host no.such.host.invalid"),
        (["--host", "192.0.2.1"], 2, "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1
    ],
)
def test_command_line_mistakes(retnet, capsys, extra, code, message):
    assert main(["serve", str(retnet[1]), *extra]) == code
    assert message in capsys.readouterr().err


def test_missing_model_and_taken_port(retnet, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(retnet[1]), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
