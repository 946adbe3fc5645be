"""Our Triton kernels equal the PyTorch reference ops, forward and gradients, with padding and carried state.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton loads); with one, the same tiny cases run on it, and the ``gpu`` tests add real sizes
and bf16.
The shapes are chosen to cross every boundary the kernels have: several chunks and a ragged tail, key and
value sides that overhang a tile, channel blocks with a ragged last one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'densessm[gpu]'): no kernel to test")

from conftest import tiny_config, tiny_mamba_config  # noqa: E402

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM  # noqa: E402
from densessm.errors import UsageError  # noqa: E402
from densessm.ops import dispatch  # noqa: E402
from densessm.ops.retention import head_log_decays  # noqa: E402
from densessm.ops.retention.chunkwise import chunkwise_retention  # noqa: E402
from densessm.ops.retention.step import recurrent_step_  # noqa: E402
from densessm.ops.scan.sequential import sequential_scan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32 = dict(rtol=1e-5, atol=1e-5)
HALF = dict(rtol=2e-2, atol=2e-2)  # fp16 inputs (11 mantissa bits), fp32 accumulation, against fp32


@pytest.fixture(scope="module")
def _kernels():
    """The kernel modules; on CPU run by the interpreter, which conftest.py switches on before triton loads."""
    retention_kernels, scan_kernels = dispatch.load_kernels("retention"), dispatch.load_kernels("scan")
    if DEVICE.type == "cpu":
        kind = type(retention_kernels._out_fwd).__name__
        assert kind == "InterpretedFunction", f"triton loaded before TRITON_INTERPRET=1 was set ({kind})"
    return SimpleNamespace(retention=retention_kernels, scan=scan_kernels)


def _grads(outputs, grads, inputs):
    loss = sum((o * g).sum() for o, g in zip(outputs, grads, strict=True))
    return torch.autograd.grad(loss, inputs)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _retention_case(batch, heads, length, key_dim, value_dim, padded, carried):
    q, k, v = (torch.randn(batch, heads, length, d, device=DEVICE) for d in (key_dim, key_dim, value_dim))
    log_decay = head_log_decays(heads).to(DEVICE)
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
        mask[0, :5] = False  # left padding, as generate() batches prompts
        mask[-1, length // 2 : length // 2 + 3] = False  # a gap inside a row
        k = k.masked_fill(~mask[:, None, :, None], float("nan"))  # padding must never be read
        v = v.masked_fill(~mask[:, None, :, None], float("nan"))
    state = None
    if carried:
        memory = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE)
        state = (memory, torch.rand(batch, heads, device=DEVICE) * 4 + 0.5)  # a decay-sum of a few tokens
    return q, k, v, log_decay, mask, state


@pytest.mark.parametrize(
    ("shape", "padded", "carried"),
    [
        ((2, 2, 37, 8, 12), False, False),  # three chunks of 16, the last one ragged
        ((2, 2, 37, 8, 12), True, True),
        ((1, 1, 20, 72, 80), True, True),  # key and value sides over one 64-wide tile
    ],
    ids=["plain", "padded+carried", "wide"],
)
def test_chunk_retention_equals_the_reference(_kernels, shape, padded, carried):
    q, k, v, log_decay, mask, state = _retention_case(*shape, padded, carried)
    inputs = _leaves(q, k, v, *(state or ()))
    ours = _kernels.retention.triton_chunk_retention(*inputs[:3], log_decay, 16, mask, tuple(inputs[3:]) or None)
    reference = _leaves(q, k.nan_to_num(), v.nan_to_num(), *(state or ()))  # the reference multiplies by the mask
    expected = chunkwise_retention(*reference[:3], log_decay, 16, mask, tuple(reference[3:]) or None)
    out, (final, scale) = ours
    torch.testing.assert_close(out, expected[0], **FP32)
    torch.testing.assert_close(final, expected[1][0], **FP32)
    torch.testing.assert_close(scale, expected[1][1], **FP32)
    assert torch.isfinite(out).all()
    grads = [torch.randn_like(out), torch.randn_like(final), torch.randn_like(scale)]
    ours_grads = _grads([out, final, scale], grads, inputs)
    expected_grads = _grads([expected[0], *expected[1]], grads, reference)
    for name, got, want in zip(["q", "k", "v", "state", "scale"], ours_grads, expected_grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_chunk_retention_in_half_precision(_kernels):
    """fp16 inputs and state take the kernels' low-precision casts (bf16 takes the same ones on a GPU; the
    interpreter has no bf16 arithmetic), against the fp32 reference of the same values."""
    q, k, v, log_decay, mask, state = _retention_case(2, 2, 37, 16, 16, padded=True, carried=True)
    q, k, v = q.half(), (k * 0.25).half(), v.half()
    state = (state[0].half(), state[1])
    inputs = _leaves(q, k, v, *state)
    out, (final, scale) = _kernels.retention.triton_chunk_retention(*inputs[:3], log_decay, 16, mask, tuple(inputs[3:]))
    reference = _leaves(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), state[0].float(), state[1])
    want, (want_final, want_scale) = chunkwise_retention(*reference[:3], log_decay, 16, mask, tuple(reference[3:]))
    assert out.dtype == final.dtype == torch.float16 and scale.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, **HALF)
    torch.testing.assert_close(final.float(), want_final, **HALF)
    torch.testing.assert_close(scale, want_scale, **FP32)
    grad = torch.randn_like(want)
    for name, got, ref in zip(
        ["q", "k", "v", "state"],
        _grads([out], [grad.half()], inputs[:4]),
        _grads([want], [grad], reference[:4]),
        strict=True,
    ):
        assert got.dtype == torch.float16, name
        torch.testing.assert_close(got.float(), ref, **HALF, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_retention_decode_step_equals_the_reference_in_place(_kernels, dtype):
    batch, heads, key_dim, value_dim = 3, 2, 8, 20
    q, k, v = (torch.randn(batch, heads, d, device=DEVICE, dtype=dtype) for d in (key_dim, key_dim, value_dim))
    log_decay = head_log_decays(heads).to(DEVICE)
    memory = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE, dtype=dtype)
    scale = torch.rand(batch, heads, device=DEVICE)
    tol = FP32 if dtype == torch.float32 else HALF
    for mask in (None, torch.tensor([True, False, True], device=DEVICE)):  # a padded row decays nothing
        ours_state, ours_scale = memory.clone(), scale.clone()
        addresses = ours_state.data_ptr(), ours_scale.data_ptr()
        out, new_state, new_scale = _kernels.retention.triton_step_(q, k, v, log_decay, ours_state, ours_scale, mask)
        reference = [x.float() for x in (q, k, v)]
        want, want_state, want_scale = recurrent_step_(*reference, log_decay, memory.float(), scale.clone(), mask)
        assert out.dtype == new_state.dtype == dtype
        torch.testing.assert_close(out.float(), want, **tol)
        torch.testing.assert_close(new_state.float(), want_state, **tol)
        torch.testing.assert_close(new_scale, want_scale, **FP32)
        assert (new_state.data_ptr(), new_scale.data_ptr()) == addresses  # updated in place, as a graph needs


def _scan_case(batch, length, channels, size, carried):
    u = torch.randn(batch, length, channels, device=DEVICE)
    delta = torch.rand(batch, length, channels, device=DEVICE) * 0.5
    delta[0, :3] = 0  # Δ = 0 is how padding is kept out of the state
    A = -torch.rand(channels, size, device=DEVICE) * 2
    B, C = torch.randn(batch, length, size, device=DEVICE), torch.randn(batch, length, size, device=DEVICE)
    state = torch.randn(batch, channels, size, device=DEVICE) if carried else None
    return [u, delta, A, B, C] + ([state] if carried else [])


@pytest.mark.parametrize(
    ("readers", "carried", "checkpoint_steps"),
    [
        (0, False, 64),  # no readers: the backward recomputes the states from checkpoints (here one stretch)
        (0, True, 4),  # three stretches of 4 steps, the last one ragged
        (2, True, 64),  # two readers above: the states are outputs, and the backward reads them
    ],
    ids=["plain", "checkpointed+carried", "dense+carried"],
)
def test_scan_equals_the_reference(_kernels, monkeypatch, readers, carried, checkpoint_steps):
    monkeypatch.setattr(_kernels.scan, "CHECKPOINT_STEPS", checkpoint_steps)
    case = _scan_case(2, 9, 40, 4, carried)  # 40 channels: a full block of 32 and a ragged one
    inputs, reference = _leaves(*case), _leaves(*case)
    state = inputs[5] if carried else None
    y, states, final = _kernels.scan.triton_scan(*inputs[:5], state=state, readers=readers)
    want_y, want_states, want_final = sequential_scan(
        *reference[:5], state=reference[5] if carried else None, readers=readers
    )
    torch.testing.assert_close(y, want_y, **FP32)
    torch.testing.assert_close(final, want_final, **FP32)
    assert len(states) == readers
    for got, want in zip(states, want_states, strict=True):
        torch.testing.assert_close(got, want, **FP32)
    grads = [torch.randn_like(y), torch.randn_like(final), *(torch.randn_like(s) for s in states)]
    ours_grads = _grads([y, final, *states], grads, inputs)
    expected_grads = _grads([want_y, want_final, *want_states], grads, reference)
    for name, got, want in zip(["u", "delta", "A", "B", "C", "state"], ours_grads, expected_grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_scan_decode_step_leaves_the_given_state_alone(_kernels):
    u, delta, A, B, C, state = _scan_case(3, 1, 40, 4, carried=True)
    given = state.clone()
    with torch.no_grad():
        y, states, final = _kernels.scan.triton_scan(u, delta, A, B, C, state=state, readers=1)
        want_y, want_states, want_final = sequential_scan(u, delta, A, B, C, state=state.clone(), readers=1)
    torch.testing.assert_close(y, want_y, **FP32)
    torch.testing.assert_close(final, want_final, **FP32)
    torch.testing.assert_close(states[0], want_states[0], **FP32)
    assert torch.equal(state, given)


# dispatch ----------------------------------------------------------------------------------------------------

CUDA_LIKE = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.kernel_path("chunkwise retention", torch.zeros(1), fla=True) == "torch"  # CPU: today's paths
    assert dispatch.kernel_path("chunkwise retention", CUDA_LIKE, fla=True) == "fla"
    assert dispatch.kernel_path("chunkwise retention", CUDA_LIKE, fla=False) == "triton"
    assert dispatch.kernel_path("selective scan", CUDA_LIKE, triton=False) == "torch"  # a call no kernel covers


def test_forced_paths_and_their_errors(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.kernel_path("chunkwise retention", CUDA_LIKE, fla=True) == "torch"
    monkeypatch.setenv(dispatch.ENV, "Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.kernel_path("selective scan", x) == "triton"
    with pytest.raises(UsageError, match="does not cover this call"):
        dispatch.kernel_path("selective scan", x, triton=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        dispatch.kernel_path("selective scan", x)
    monkeypatch.setenv(dispatch.ENV, "fla")
    with pytest.raises(UsageError, match="flash-linear-attention cannot run chunkwise retention"):
        dispatch.kernel_path("chunkwise retention", x, fla=False)
    assert dispatch.kernel_path("selective scan", x) == "torch"  # fla has no scan: the automatic path
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(UsageError, match=r"DENSESSM_KERNELS='cuda' is not a kernel path: use one of auto, torch"):
        dispatch.kernel_path("selective scan", x)


def test_each_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    caplog.set_level("INFO", logger="densessm.kernels")
    for _ in range(3):
        dispatch.kernel_path("an op of this test", CUDA_LIKE, fla=False)
    assert [r.getMessage() for r in caplog.records] == ["an op of this test runs on the triton path (cuda tensors)"]


# through the models ------------------------------------------------------------------------------------------


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _forward_backward(model, ids, mask, path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, path)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_models_train_and_decode_alike_on_the_triton_path(_kernels, monkeypatch, family):
    if family == "retnet":  # chunkwise: the training mode the retention kernel serves (the parallel form has none)
        config = tiny_config(forward_mode="chunkwise", chunk_size=16, num_hidden_layers=2, dense_block_layers=1)
        model, kernel = DenseRetNetForCausalLM(config), "retention"
        names = ("triton_chunk_retention", "triton_step_")
    else:
        model, kernel = DenseMambaForCausalLM(tiny_mamba_config()), "scan"
        names = ("triton_scan",)
    model = model.to(DEVICE)
    calls = [_count_calls(monkeypatch, getattr(_kernels, kernel), name) for name in names]
    ids = torch.randint(3, 97, (2, 19), device=DEVICE)  # two chunks of 16, the second ragged
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    logits, grads = _forward_backward(model, ids, mask, "torch", monkeypatch)
    assert not any(calls)
    ours, ours_grads = _forward_backward(model, ids, mask, "triton", monkeypatch)
    assert calls[0], "the model did not reach the Triton kernel"
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    assert ours_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)

    model.config.forward_mode = "auto"  # a prompt: chunkwise from the empty state; a token: the recurrent step
    tokens = {}
    for path in ("torch", "triton"):  # a prompt, then decode steps from its state (the fused step kernels)
        for made in calls:
            made.clear()
        monkeypatch.setenv(dispatch.ENV, path)
        with torch.no_grad():
            tokens[path] = model.generate(ids[:, :9], attention_mask=mask[:, :9], max_new_tokens=3, do_sample=False)
        assert all(calls) if path == "triton" else not any(calls), f"{path}: {calls}"
    assert torch.equal(tokens["triton"], tokens["torch"])


# real sizes on a GPU -----------------------------------------------------------------------------------------


def _assert_as_accurate(got, baseline, exact, dtype, name, slack=4.0):
    """``got`` (a kernel's result) is as close to ``exact`` (float64, from the same rounded inputs) as
    ``baseline`` (the PyTorch form in the same precision) is, within ``slack`` times its error: a kernel may
    round elsewhere than PyTorch does, not worse. At real sizes a fixed tolerance fails on a few elements of
    either path alone. The floor, a few units in the last place of ``dtype`` at the result's scale, keeps a
    baseline that happens to round exactly from demanding zero."""
    exact = exact.double()
    scale = exact.abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * scale
    error = (got.double() - exact).abs().max().item()
    base = (baseline.double() - exact).abs().max().item()
    assert error <= slack * base + floor, (
        f"{name}: largest error {error:.3g} against float64, the PyTorch path's {base:.3g} "
        f"(allowed {slack} x that + {floor:.3g}; values up to {scale:.3g})"
    )


def _chunk_retention_accuracy(chunk_fn, dtype, batch, heads, length, key_dim, value_dim):
    """``chunk_fn`` (a kernel of chunkwise retention) against PyTorch's chunkwise form in ``dtype`` and in
    float64, on the same rounded inputs, with padding and a carried state: outputs, final state and gradients."""
    q, k, v, log_decay, mask, (memory, scale) = _retention_case(
        batch, heads, length, key_dim, value_dim, padded=True, carried=True
    )
    k, v = k.nan_to_num() * key_dim**-0.5, v.nan_to_num()  # k scaled as the model scales it
    rounded = [x.to(dtype) for x in (q, k, v, memory)]  # every path reads these same values
    runs = {}
    for path, fn, cast in (
        ("kernel", chunk_fn, dtype),
        ("torch", chunkwise_retention, dtype),
        ("exact", chunkwise_retention, torch.float64),
    ):
        leaves = _leaves(*(x.to(cast) for x in rounded), scale.double() if cast == torch.float64 else scale)
        decay = log_decay.double() if cast == torch.float64 else log_decay
        out, (final, new_scale) = fn(*leaves[:3], decay, 64, mask, tuple(leaves[3:]))
        torch.manual_seed(7)  # the same upstream gradient for every path
        grad = torch.randn(out.shape, device=DEVICE, dtype=out.dtype)
        runs[path] = [out, final, new_scale, *_grads([out], [grad], leaves[:4])]
    for i, name in enumerate(["output", "final state", "scale", "grad q", "grad k", "grad v", "grad state"]):
        _assert_as_accurate(runs["kernel"][i], runs["torch"][i], runs["exact"][i], dtype, name)


def test_the_accuracy_check_catches_a_wrong_kernel():
    """The real-size checks below run only on a GPU: here their comparison is shown to pass the PyTorch form
    itself and to fail a kernel that forgets one step of the decay."""
    _chunk_retention_accuracy(chunkwise_retention, torch.float32, 2, 2, 70, 16, 32)

    def forgets_the_decay(q, k, v, log_decay, chunk_size, mask, state):
        return chunkwise_retention(q, k, v, log_decay * 0.99, chunk_size, mask, state)

    with pytest.raises(AssertionError, match="output: largest error"):
        _chunk_retention_accuracy(forgets_the_decay, torch.float32, 2, 2, 70, 16, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_chunk_retention_at_real_size(_kernels, dtype):
    """DenseRetNet-350M's retention shape (4 heads of 256 key and 512 value channels) at L = 2,048, with padding
    and a carried state, as accurate as the PyTorch chunkwise form in the same precision."""
    _chunk_retention_accuracy(_kernels.retention.triton_chunk_retention, dtype, 2, 4, 2048, 256, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fla_bridge_equals_the_reference():
    """flash-linear-attention computes exactly our function (where it is installed)."""
    from densessm.ops.retention.fla_bridge import fla_chunk_retention, fla_usable

    q, k, v, log_decay, mask, state = _retention_case(2, 4, 1000, 64, 128, padded=True, carried=True)
    k, v = k.nan_to_num(), v.nan_to_num()
    if not fla_usable(q):
        pytest.skip("flash-linear-attention is not installed")
    out, (final, scale) = fla_chunk_retention(q, k, v, log_decay, mask, state)
    want, (want_final, want_scale) = chunkwise_retention(q, k, v, log_decay, 64, mask, state)
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(final, want_final, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scan_at_real_size(_kernels):
    """DenseMamba-360M's scan (2,048 channels, N = 16) at L = 2,048 with two readers, as accurate as the blocked
    form in fp32 (both against float64)."""
    from densessm.ops.scan.blocked import blocked_scan

    case = _scan_case(2, 2048, 2048, 16, carried=True)
    runs = {}
    for path, fn, cast in (
        ("kernel", _kernels.scan.triton_scan, torch.float32),
        ("torch", blocked_scan, torch.float32),
        ("exact", blocked_scan, torch.float64),
    ):
        leaves = _leaves(*(x.to(cast) for x in case))
        y, states, final = fn(*leaves[:5], state=leaves[5], readers=2)
        torch.manual_seed(7)
        grads = [torch.randn(t.shape, device=DEVICE, dtype=t.dtype) for t in (y, *states)]
        runs[path] = [y, final, *states, *_grads([y, *states], grads, leaves)]
    names = ["y", "final state", "state 1", "state 2", *(f"grad {n}" for n in ("u", "delta", "A", "B", "C", "state"))]
    for i, name in enumerate(names):
        _assert_as_accurate(runs["kernel"][i], runs["torch"][i], runs["exact"][i], torch.float32, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_steps_replay_in_a_cuda_graph(_kernels, dtype):
    """The fused step captured once and replayed, at batch 64 of a 350M model's layer, is as accurate as the
    PyTorch step in the same precision, step after step, and updates the state where it lies."""
    batch, heads, key_dim, value_dim = 64, 4, 256, 512
    q, k, v = (torch.randn(batch, heads, d, device=DEVICE, dtype=dtype) for d in (key_dim, key_dim, value_dim))
    k = k * key_dim**-0.5  # as the model scales it
    log_decay = head_log_decays(heads).to(DEVICE)
    memory = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE, dtype=dtype)
    scale = torch.rand(batch, heads, device=DEVICE) + 1
    torch_state, torch_scale = memory.clone(), scale.clone()
    exact_state, exact_scale = memory.double(), scale.double()
    state, kept = memory.clone(), scale.clone()
    _kernels.retention.triton_step_(q, k, v, log_decay, state.clone(), kept.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _, _ = _kernels.retention.triton_step_(q, k, v, log_decay, state, kept)
    for step in range(3):
        graph.replay()
        want, _, _ = recurrent_step_(q, k, v, log_decay, torch_state, torch_scale)
        exact, _, _ = recurrent_step_(q.double(), k.double(), v.double(), log_decay.double(), exact_state, exact_scale)
        _assert_as_accurate(out, want, exact, dtype, f"step {step} output")
        _assert_as_accurate(state, torch_state, exact_state, dtype, f"step {step} state")
        _assert_as_accurate(kept, torch_scale, exact_scale, torch.float32, f"step {step} scale")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_models_choose_the_kernels_by_themselves(_kernels, monkeypatch):
    """On CUDA tensors the automatic choice is the Triton path (fla and mamba_ssm are absent on the test GPU)."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    calls = [_count_calls(monkeypatch, _kernels.retention, "triton_chunk_retention")]
    calls.append(_count_calls(monkeypatch, _kernels.scan, "triton_scan"))
    ids = torch.randint(3, 97, (1, 300), device=DEVICE)
    DenseRetNetForCausalLM(tiny_config()).to(DEVICE)(input_ids=ids)  # auto: chunkwise beyond 256 tokens
    DenseMambaForCausalLM(tiny_mamba_config()).to(DEVICE)(input_ids=ids)
    assert all(calls)
