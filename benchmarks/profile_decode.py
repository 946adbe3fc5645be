"""Where one decode step's time goes, and how close it is to the memory-bandwidth bound.

A decode step at batch 6 is memory-bound: it reads every weight once and passes over the recurrent state a
few times. This script times a step of a preset (batch 6, synthesised state, prepacked weights), splits a
``torch.profiler`` trace into weight products, state update + read-out, and everything else, and measures
this machine's copy and read bandwidth *in the same run* (a shared machine's bandwidth varies by 2x within
an hour, so a bound from another moment means little).

    python benchmarks/profile_decode.py --preset dense_retnet_350m --dtype float32
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from densessm.inference import prepack_for_cpu
from densessm_lab.bench.measure import copy_bandwidth
from densessm_lab.bench.models import DTYPES, build, synthetic_cache

GEMMS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")
STATE_OPS = ("aten::mul_", "aten::baddbmm_", "aten::bmm")  # the in-place retention step (ops/retention/step.py)
STATE_PASSES = 5  # scale in place (read + write), rank-1 update (read + write), read-out (read)


def _best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dense_retnet_350m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    model = prepack_for_cpu(build(args.preset, dtype))
    cache = synthetic_cache(model, args.batch, 1024, 3 * args.steps + 3)
    token = torch.randint(3, model.config.vocab_size, (args.batch, 1))
    with torch.no_grad():
        for _ in range(3):
            model(token, cache=cache, use_cache=True)
        step = _best_seconds(lambda: model(token, cache=cache, use_cache=True), args.steps)
        with profile() as trace:
            for _ in range(args.steps):
                model(token, cache=cache, use_cache=True)
    per_op = {e.key: e.self_cpu_time_total / args.steps / 1e3 for e in trace.key_averages()}
    total = sum(per_op.values())
    gemm = sum(per_op.get(k, 0.0) for k in GEMMS)
    state = sum(per_op.get(k, 0.0) for k in STATE_OPS)
    other = total - gemm - state
    print(
        f"{args.preset} {args.dtype} batch {args.batch}: step {step * 1e3:.1f} ms (best of {args.steps}); "
        f"profiled {total:.1f} ms: weight products {gemm:.1f} ({gemm / total:.0%}), state update + read-out "
        f"{state:.1f} ({state / total:.0%}), other operators {other:.1f} ({other / total:.0%})"
    )

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * torch.finfo(t.dtype).bits // 8

    weights = sum(nbytes(b) for name, b in model.named_buffers() if name.endswith("weight"))
    weights += sum(nbytes(p) for name, p in model.named_parameters() if "embed" not in name)
    state_bytes = sum(nbytes(t) for layer in cache.layers for t in layer.values())
    traffic = weights + STATE_PASSES * state_bytes
    print(
        f"memory traffic per step: weights {weights / 1e9:.3f} GB + {STATE_PASSES} x state {state_bytes / 1e9:.3f} GB "
        f"= {traffic / 1e9:.2f} GB"
    )
    copy = copy_bandwidth(10)
    # 256 MiB of fp32 (bandwidth does not depend on the dtype; an fp32 sum is not compute-bound)
    source = torch.ones(2**26)
    read = nbytes(source) / _best_seconds(source.sum, 10) / 1e9
    for name, bandwidth in (("copy (read + write)", copy), ("read (sum)", read)):
        bound = traffic / (bandwidth * 1e9)
        print(
            f"{name}: {bandwidth:.1f} GB/s -> bound {bound * 1e3:.1f} ms/step ({args.batch / bound:.0f} tokens/s); "
            f"measured {step * 1e3:.1f} ms ({args.batch / step:.0f} tokens/s) = {bound / step:.0%} of the bound"
        )


if __name__ == "__main__":
    main()
