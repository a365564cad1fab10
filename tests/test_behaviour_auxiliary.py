"""CoMMIT's auxiliary loss as a training loop uses it (our interpretation): which side lags
for a given κ̂ and tolerance, the loss is −λ·KL(sg(p_prev) ‖ p) (a 0-d fp32 zero when λ = 0),
its gradient lands only on the parameters given, and misuse is refused by name."""
import pytest
import torch

from mlan_kernels.ops.kl_div import kl_div_logits
from mlan_kernels.training import auxiliary_kl_loss, backward_auxiliary, lagging_side


@pytest.mark.parametrize("kappa_hat, tolerance, side", [
    (None, 0.0, None), (1.0, 0.0, None), (1.0 + 1e-9, 0.0, "language"), (1.0 - 1e-9, 0.0, "feature"),
    (1.2, 0.2, None), (0.8, 0.2, None), (1.2 + 1e-9, 0.2, "language"), (0.8 - 1e-9, 0.2, "feature"),
])
def test_the_lagging_side_is_the_one_that_moved_the_output_less(kappa_hat, tolerance, side):
    """κ̂ > 1 + tolerance: the feature side moved the output more, language lags; κ̂ below
    1 − tolerance: feature lags; inside the band (its ends included): neither."""
    assert lagging_side(kappa_hat, tolerance) == side
    if tolerance == 0.0:
        assert lagging_side(kappa_hat) == side                 # the default tolerance is 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_weight_is_a_float32_zero_without_a_graph(dtype):
    logits = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    loss = auxiliary_kl_loss(logits, torch.randn(3, 5))
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0
    assert not loss.requires_grad
    backward_auxiliary(loss, [logits])                       # nothing to propagate: a no-op
    assert logits.grad is None


def test_the_loss_is_minus_weight_times_the_kl_from_the_detached_previous_distribution():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=generator, dtype=torch.float64).requires_grad_()
    previous = torch.randn(4, 6, generator=generator, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([True, False, True, True])
    loss = auxiliary_kl_loss(logits, previous, mask, weight=0.7)
    expected = -0.7 * kl_div_logits(previous.detach(), logits.detach(), mask)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert previous.grad is None and logits.grad.abs().sum() > 0   # sg(p_prev)
    # previous logits in another dtype are read in the logits' dtype
    half = auxiliary_kl_loss(logits, previous.detach().to(torch.float32), mask, weight=0.7)
    torch.testing.assert_close(half.detach(), expected, rtol=1e-6, atol=1e-7)


def test_gradient_accumulates_only_into_the_given_parameters_that_train():
    lagging, frozen, other = (torch.randn(5, requires_grad=True), torch.randn(5),
                              torch.randn(5, requires_grad=True))
    other.grad = torch.ones(5)
    lagging.grad = torch.ones(5)
    logits = (lagging + other + frozen).reshape(1, 5)
    loss = auxiliary_kl_loss(logits, torch.randn(1, 5), weight=2.0)
    reference = torch.autograd.grad(loss, lagging, retain_graph=True)[0]
    backward_auxiliary(loss, [lagging, frozen], retain_graph=True)
    torch.testing.assert_close(lagging.grad, 1 + reference)           # accumulated, not replaced
    assert torch.equal(other.grad, torch.ones(5)) and frozen.grad is None
    backward_auxiliary(loss, [lagging])                               # the graph was kept
    torch.testing.assert_close(lagging.grad, 1 + 2 * reference)
    with pytest.raises(RuntimeError, match="second time"):            # by default it is freed
        backward_auxiliary(loss, [lagging])


def test_the_kl_backend_asked_for_is_the_one_used():
    logits = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="^backend must be one of"):
        auxiliary_kl_loss(logits, logits.detach(), weight=1.0, backend="no-such-backend")


def test_misuse_is_refused_by_name():
    logits = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"^weight must be >= 0 \(it is λ\), got -0\.5$"):
        auxiliary_kl_loss(logits, logits.detach(), weight=-0.5)
    with pytest.raises(ValueError, match=r"^lagging_params must contain at least one parameter "
                                         r"with requires_grad$"):
        backward_auxiliary(logits.sum(), [torch.randn(3)])
