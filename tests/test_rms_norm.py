"""RMSNorm's hand-written backward (densessm.ops.rms_norm) against torch's rms_norm: values bit-identical, gradients
to rounding in float64, second-order gradients, the transforms that need torch's form, and the models' norms
running through it in training."""

from __future__ import annotations

import pytest
import torch

from densessm import DenseRetNetForCausalLM
from densessm.models.norm import RMSNorm
from densessm.ops.rms_norm import naive_rms_norm, rms_norm
from densessm.presets import load_preset


def inputs(seed: int, dtype=torch.float64, transposed: bool = False):
    """A random input (a transposed view when asked: the heads' output norm gets one) and weight."""
    gen = torch.Generator().manual_seed(seed)
    rows, heads, width = (int(torch.randint(1, n, (), generator=gen)) for n in (30, 4, 40))
    base = torch.randn(2, heads, rows, width, generator=gen, dtype=dtype)
    x = base.transpose(1, 2) if transposed else base
    weight = torch.randn(width, generator=gen, dtype=dtype)
    return x.requires_grad_(), weight.requires_grad_()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("transposed", [False, True])
def test_values_are_torch_s_bit_for_bit_and_gradients_equal_to_rounding(seed, transposed):
    x, weight = inputs(seed, torch.float32, transposed)
    out = rms_norm(x, weight, 1e-6)
    assert out.grad_fn.name() == "_RMSNormBackward"  # the hand-written op ran, not torch's
    assert torch.equal(out, naive_rms_norm(x, weight, 1e-6))
    x, weight = inputs(seed, torch.float64, transposed)
    grad = torch.randn_like(x)
    for wanted in ((x, weight), (x,), (weight,)):
        got = torch.autograd.grad(rms_norm(x, weight, 1e-6), wanted, grad)
        want = torch.autograd.grad(naive_rms_norm(x, weight, 1e-6), wanted, grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_second_order_gradients_are_torch_s():
    x, weight = inputs(7, transposed=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, weight))
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, weight))
    assert torch.autograd.gradgradcheck(lambda a: rms_norm(a, weight.detach(), 1e-5), (x,))


def test_forward_mode_ad_and_torch_func_get_torch_s_form():
    x, weight = inputs(3)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), tangent)
        got = torch.autograd.forward_ad.unpack_dual(rms_norm(dual, weight, 1e-6)).tangent
    _, want = torch.func.jvp(lambda a: naive_rms_norm(a, weight.detach(), 1e-6), (x.detach(),), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda a: rms_norm(a, weight, 1e-6).square().sum())(x.detach())
    x_ = x.detach().requires_grad_()
    naive_rms_norm(x_, weight, 1e-6).square().sum().backward()
    torch.testing.assert_close(grad, x_.grad, rtol=1e-12, atol=1e-12)
    rows = torch.func.vmap(lambda a: rms_norm(a, weight, 1e-6))(x.detach())
    torch.testing.assert_close(rows, naive_rms_norm(x.detach(), weight, 1e-6), rtol=0, atol=0)


def test_without_gradients_torch_s_norm_runs():
    x, weight = inputs(1)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, weight, 1e-6), naive_rms_norm(x, weight, 1e-6))
    assert rms_norm(x.detach(), weight.detach(), 1e-6).grad_fn is None


def test_a_bf16_norm_takes_its_statistics_in_fp32_with_the_same_gradients_as_torch_s_form(monkeypatch):
    norm = RMSNorm(24).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24).bfloat16().requires_grad_()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().square().sum(), (x, norm.weight))
    monkeypatch.setattr("densessm.models.norm.rms_norm", naive_rms_norm)
    want_out = norm(x)
    want = torch.autograd.grad(want_out.float().square().sum(), (x, norm.weight))
    assert torch.equal(out, want_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_every_norm_of_a_training_model_runs_through_the_op_and_its_gradients_are_torch_s(monkeypatch):
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(load_preset("dense_retnet_tiny")).double().train()
    model.config.dropout = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    seen = []
    original = rms_norm

    def counting(*args):
        out = original(*args)
        seen.append(out.grad_fn.name())
        return out

    monkeypatch.setattr("densessm.models.norm.rms_norm", counting)
    loss = model(input_ids=ids, labels=ids).loss
    norms = [module for module in model.modules() if isinstance(module, RMSNorm)]
    assert len(seen) >= len(norms) and set(seen) == {"_RMSNormBackward"}
    got = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr("densessm.models.norm.rms_norm", naive_rms_norm)
    want = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_inputs_the_op_does_not_cover_get_torch_s_form():
    x, weight = inputs(2, torch.float32)
    flat = x.detach()[:, :, :1].requires_grad_()  # [2, H, 1, D]: a weight over its last two dimensions fits
    for a, b in ((x.bfloat16(), weight.bfloat16()), (x, weight.double()), (flat, weight[None].detach().clone())):
        out = rms_norm(a, b, 1e-6)
        assert out.grad_fn.name() != "_RMSNormBackward"
        assert torch.equal(out, torch.nn.functional.rms_norm(a, b.shape, b, 1e-6))


def test_an_input_without_gradient_is_not_kept_so_writing_it_after_the_norm_is_allowed():
    x, weight = inputs(4, torch.float32)
    x = x.detach()
    out = rms_norm(x, weight, 1e-6)
    assert out.grad_fn.name() == "_RMSNormBackward"
    want = torch.autograd.grad(naive_rms_norm(x, weight, 1e-6).square().sum(), weight)[0]
    x.add_(1.0)  # torch's form keeps nothing of x when only the weight needs a gradient
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), weight)[0], want)
    x64, weight64 = inputs(5)
    assert torch.autograd.gradgradcheck(lambda b: rms_norm(x64.detach(), b, 1e-5), (weight64,))


def test_a_backward_inside_an_autocast_region_keeps_the_forward_s_precision():
    x, weight = inputs(6, torch.float32)
    grad = torch.randn_like(x)
    want = torch.autograd.grad(naive_rms_norm(x, weight, 1e-6), (x, weight), grad)
    out = rms_norm(x, weight, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out, (x, weight), grad)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_weight_that_does_not_fit_is_refused_as_torch_refuses_it_and_an_empty_width_is_torch_s():
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        rms_norm(x, torch.ones(1, requires_grad=True), 1e-6)
    empty, weight = torch.randn(5, 0, requires_grad=True), torch.ones(0, requires_grad=True)
    d_x, d_weight = torch.autograd.grad(rms_norm(empty, weight, 1e-6).sum(), (empty, weight))
    assert d_x.shape == (5, 0) and d_weight.shape == (0,)
