"""Load benchmark of ``densessm serve``: N concurrent streaming clients against N sequential ``generate()`` calls,
and the time to first token of a request whose long system prompt is in the prompt-state cache against one
whose is not. Writes ``<out>.json``, ``<out>.md`` (tables) and ``<out>.png`` (plots).

    python benchmarks/bench_serve.py --out docs/benchmarks/serve          # DenseRetNet-350M, random weights

Random weights are fine for speed (the work per token does not depend on the values); every completion is
exactly ``--new-tokens`` long (the end-of-text token is banned on both sides). The sequential baseline runs
in a process of its own before the server starts, so the two never share the CPU; both use the same
prepacked fp32 model. Tokens per second count generated tokens over the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, SequenceBiasLogitsProcessor

from densessm.inference import prepack_for_cpu
from densessm.loading import load_causal_lm, read_config
from densessm.presets import load_preset

TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "densessm" / "resources" / "tokenizer"


def build_model(preset: str, directory: Path) -> Path:
    """A randomly initialised preset, saved with the bundled tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset(preset))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    return directory


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (count, length), generator=g).tolist()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


# --- the sequential baseline (a child process: `bench_serve.py --baseline-worker MODEL_DIR`) ---------------------


class _Clock:
    """A generate() streamer that only notes when each token arrives (the first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def baseline_worker(model_dir: Path) -> None:
    """Load the model once, then run each job read from stdin (a JSON line: prompts, new_tokens) as sequential
    generate() calls and answer with a JSON line on stdout."""
    model = prepack_for_cpu(load_causal_lm(model_dir))
    ban = SequenceBiasLogitsProcessor({(model.generation_config.eos_token_id,): -100.0})
    with torch.no_grad():
        model.generate(torch.tensor([[10] * 8]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for line in sys.stdin:
            job = json.loads(line)
            ttft, per_token = [], []
            load = os.getloadavg()[0]
            start = time.perf_counter()
            for prompt in job["prompts"]:
                clock = _Clock()
                began = time.perf_counter()
                model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=job["new_tokens"],
                    do_sample=False,
                    pad_token_id=0,
                    logits_processor=[ban],
                    streamer=clock,
                )
                tokens = clock.times[1:]
                ttft.append(tokens[0] - began)
                per_token += [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
            wall = time.perf_counter() - start
            result = {
                "requests": len(job["prompts"]),
                "wall_s": wall,
                "tokens_per_s": len(job["prompts"]) * job["new_tokens"] / wall,
                "ttft_s": summary(ttft),
                "per_token_s": summary(per_token),
                "load": [load, os.getloadavg()[0]],
            }
            print(json.dumps(result), flush=True)


class Baseline:
    """The sequential generate() calls, in a process of their own (loaded once, idle while the server runs)."""

    def __init__(self, model_dir: Path):
        command = [sys.executable, __file__, "--baseline-worker", str(model_dir)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline process died")
        return json.loads(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


# --- the server ----------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, model_dir: Path, *flags: str):
        self.name = model_dir.name
        command = [sys.executable, "-m", "densessm.cli", "serve", str(model_dir), "--port", "0", *flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, self.banner = None, ""
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("densessm serve: ") and " at http://" in line:
                    self.banner = line.strip()
                    self.url = line.split(" at ", 1)[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=3600)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(120)


def stream_times(stream) -> list[float]:
    """When each generated token arrived (chunks carrying log-probabilities: one per token)."""
    times = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            times.append(time.perf_counter())
    return times


def run_clients(server: Server, prompts: list[list[int]], new_tokens: int, eos: int) -> dict:
    """All prompts at once, one streaming client each."""

    def one(prompt: list[int]) -> tuple[float, list[float]]:
        client = server.client()
        began = time.perf_counter()
        stream = client.completions.create(
            model=server.name,
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            logit_bias={str(eos): -100},
            logprobs=0,
            stream=True,
        )
        return began, stream_times(stream)

    load = os.getloadavg()[0]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    wall = max(times[-1] for _, times in results) - start
    assert all(len(times) == new_tokens for _, times in results), "a completion was cut short"
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "tokens_per_s": len(prompts) * new_tokens / wall,
        "ttft_s": summary([times[0] - began for began, times in results]),
        "per_token_s": summary([b - a for _, times in results for a, b in zip(times, times[1:], strict=False)]),
        "load": [load, os.getloadavg()[0]],
    }


def system_prompt_ttft(server: Server, tokenizer, tokens: int, repeats: int) -> dict:
    """Time to first token of chats whose ~``tokens``-token system prompt is new (a cold read) or the one an
    earlier chat had (a cache hit at the end of the system message)."""
    client = server.client()
    vocab = len(tokenizer)

    def system(seed: int) -> str:
        return tokenizer.decode(random_prompts(1, tokens, vocab, seed)[0])

    def ask(text: str, question: str) -> tuple[float, int, int]:
        began = time.perf_counter()
        stream = client.chat.completions.create(
            model=server.name,
            messages=[{"role": "system", "content": text}, {"role": "user", "content": question}],
            max_tokens=2,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        first, usage = None, None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].logprobs is not None:
                first = time.perf_counter()
            usage = chunk.usage or usage
        return first - began, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    cold = [ask(system(1000 + i), f"Question {i}: what follows?") for i in range(repeats)]
    shared = system(999)
    ask(shared, "A first question puts the system prompt in the cache.")
    warm = [ask(shared, f"Question {i}: and then?") for i in range(repeats)]
    return {
        "prompt_tokens": statistics.fmean(p for _, p, _ in cold + warm),
        "uncached_ttft_s": summary([t for t, _, _ in cold]),
        "cached_ttft_s": summary([t for t, _, _ in warm]),
        "cached_tokens": statistics.fmean(c for _, _, c in warm),
        "uncached_cached_tokens": statistics.fmean(c for _, _, c in cold),
    }


# --- report ----------------------------------------------------------------------------------------------------------


def _rounds(row: dict) -> str:
    return ", ".join(f"{v:.1f}" for v in row["rounds_tokens_per_s"])


def _ratios(row: dict, base: dict) -> str:
    """Server over baseline within each round (the two ran minutes apart, under the same conditions)."""
    pairs = zip(row["rounds_tokens_per_s"], base["rounds_tokens_per_s"], strict=True)
    return ", ".join(f"{server / sequential:.2f}x" for server, sequential in pairs)


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base, rows = result["baseline"], result["server"]
    lines = [
        "# `densessm serve` under load (CPU)",
        "",
        f"Command: `{result['command']}`. Measured {result['date']} on {result['machine']}; model "
        f"{result['model']} ({result['parameters']:,} parameters, random weights, fp32, prepacked), prompts of "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} generated tokens each (greedy, end-of-text "
        f"banned). Server: `{result['server_flags']}`. The baseline (one process) and the server (another) "
        f"alternate over {result['rounds']} rounds on a machine shared with other jobs; each row is its best round "
        "(the last columns list every round's tokens/s and, per round, the server's over the baseline's).",
        "",
        "| run | requests | wall (s) | tokens/s | vs sequential | TTFT p50 (s) | TTFT p95 (s) | per token p50 (ms) | "
        "per token p95 (ms) | tokens/s, rounds | vs sequential, rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        f"| sequential `generate()` | {base['requests']} | {base['wall_s']:.1f} | {base['tokens_per_s']:.2f} | 1.00x | "
        f"{base['ttft_s']['p50']:.2f} | {base['ttft_s']['p95']:.2f} | {1e3 * base['per_token_s']['p50']:.0f} | "
        f"{1e3 * base['per_token_s']['p95']:.0f} | {_rounds(base)} | |",
    ]
    for row in rows:
        lines.append(
            f"| server, {row['requests']} concurrent | {row['requests']} | {row['wall_s']:.1f} | "
            f"{row['tokens_per_s']:.2f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{row['ttft_s']['p50']:.2f} | {row['ttft_s']['p95']:.2f} | {1e3 * row['per_token_s']['p50']:.0f} | "
            f"{1e3 * row['per_token_s']['p95']:.0f} | {_rounds(row)} | {_ratios(row, base)} |"
        )
    cache = result["prefix_cache"]
    ratio = cache["cached_ttft_s"]["p50"] / cache["uncached_ttft_s"]["p50"]
    lines += [
        "",
        f"Time to first token of a chat with a system prompt of ~{cache['prompt_tokens']:.0f} prompt tokens in all "
        f"({cache['repeats']} chats each):",
        "",
        "| system prompt | tokens read from cache | TTFT p50 (s) | TTFT p95 (s) |",
        "|---|---:|---:|---:|",
        f"| new (cold read) | {cache['uncached_cached_tokens']:.0f} | {cache['uncached_ttft_s']['p50']:.2f} | "
        f"{cache['uncached_ttft_s']['p95']:.2f} |",
        f"| seen before (cached state) | {cache['cached_tokens']:.0f} | {cache['cached_ttft_s']['p50']:.2f} | "
        f"{cache['cached_ttft_s']['p95']:.2f} |",
        "",
        f"Cached / uncached TTFT (p50): {ratio:.3f}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    clients = [row["requests"] for row in rows]
    left.plot(clients, [row["tokens_per_s"] for row in rows], "o-", label="server, N concurrent clients")
    left.axhline(base["tokens_per_s"], color="gray", linestyle="--", label="sequential generate() calls")
    left.set_xscale("log", base=2)
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_xlabel("clients")
    left.set_ylabel("generated tokens / s")
    left.set_title("throughput")
    left.legend()
    right.bar(
        ["new system prompt", "cached system prompt"],
        [cache["uncached_ttft_s"]["p50"], cache["cached_ttft_s"]["p50"]],
        color=["tab:gray", "tab:green"],
    )
    right.set_ylabel("time to first token, p50 (s)")
    right.set_title(f"~{cache['prompt_tokens']:.0f}-token prompt")
    fig.suptitle(f"densessm serve, {result['model']} on {result['machine']}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def best(runs: list[dict]) -> dict:
    """The round with the highest throughput (the least disturbed by other work on a shared machine), with
    every round's tokens/s and load average."""
    top = max(runs, key=lambda run: run["tokens_per_s"])
    return {
        **top,
        "rounds_tokens_per_s": [run["tokens_per_s"] for run in runs],
        "rounds_load": [r["load"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dense_retnet_350m")
    parser.add_argument("--model-dir", type=Path, help="a saved model with tokenizer (default: the preset, random)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/server rounds; the best is kept")
    parser.add_argument("--system-tokens", type=int, default=2000, help="system prompt of the TTFT test")
    parser.add_argument("--repeats", type=int, default=3, help="chats per TTFT case")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/serve"))
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
    if args.baseline_worker is not None:
        baseline_worker(args.baseline_worker)
        return

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or build_model(args.preset, Path(scratch) / args.preset)
        config = read_config(model_dir)
        with torch.device("meta"):
            parameters = AutoModelForCausalLM.from_config(config).num_parameters()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab = min(len(tokenizer), config.vocab_size)
        width = max(args.clients)
        prompts = random_prompts(width, args.prompt_tokens, vocab, seed=1)
        context = args.system_tokens + args.prompt_tokens + args.new_tokens + 256
        flags = ["--max-batch", str(width), "--max-model-len", str(max(context, 2048))]
        baseline, server = Baseline(model_dir), Server(model_dir, *flags)
        try:
            print(server.banner, file=sys.stderr, flush=True)
            run_clients(server, prompts[:1], 4, config.eos_token_id)  # warm-up
            sequential, concurrent = [], {count: [] for count in args.clients}
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}: {width} sequential generate() calls ...", file=sys.stderr, flush=True)
                sequential.append(baseline.run(prompts, args.new_tokens))
                for count in args.clients:
                    print(f"round {round_ + 1}: server, {count} concurrent clients ...", file=sys.stderr, flush=True)
                    concurrent[count].append(run_clients(server, prompts[:count], args.new_tokens, config.eos_token_id))
            print("server: time to first token, cached vs new system prompt ...", file=sys.stderr, flush=True)
            cache = system_prompt_ttft(server, tokenizer, args.system_tokens, args.repeats)
            cache["repeats"] = args.repeats
        finally:
            server.stop()
            baseline.stop()

    result = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": args.preset if args.model_dir is None else args.model_dir.name,
        "parameters": parameters,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "server_flags": " ".join(flags),
        "baseline": best(sequential),
        "server": [best(concurrent[count]) for count in args.clients],
        "prefix_cache": cache,
    }
    write_report(result, args.out)
    print(args.out.with_suffix(".md").read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
