from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_beitv2 import NormEMAVectorQuantizer
from modeling_beitv2.quantizer import cosine_kmeans, nearest_code_indices


def reference_step(codebook, cluster_size, z, decay, beta, training):
    """The reference algorithm, one-hot and full distance matrix (written from the reference notes)."""
    z = F.normalize(z, dim=-1)
    flat = z.reshape(-1, codebook.shape[1])
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.T
    indices = distances.argmin(1)
    codes = codebook[indices].view(z.shape)
    one_hot = F.one_hot(indices, codebook.shape[0]).float()
    counts = one_hot.sum(0)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    codebook = codebook.clone()
    if training:
        unused = counts == 0
        means = F.normalize((flat.detach().T @ one_hot / counts.masked_fill(unused, 1)).T, dim=-1)
        means = torch.where(unused[:, None], codebook, means)
        codebook = F.normalize(decay * codebook + (1 - decay) * means, dim=-1)
    loss = beta * F.mse_loss(codes.detach(), z)
    return codebook, cluster_size, indices.view(z.shape[:-1]), loss, z + (codes - z).detach()


@pytest.mark.parametrize("training", [True, False])
def test_matches_reference_update(training):
    torch.manual_seed(0)
    quantizer = NormEMAVectorQuantizer(codebook_size=64, code_dim=8, decay=0.9, beta=0.5, chunk_size=7)
    quantizer.train(training)
    codebook, cluster_size = quantizer.codebook.clone(), quantizer.cluster_size.clone()
    for _ in range(3):
        z = torch.randn(4, 5, 8, requires_grad=True)
        z_ref = z.detach().clone().requires_grad_(True)
        out = quantizer(z)
        codebook, cluster_size, indices, loss, quantized = reference_step(
            codebook, cluster_size, z_ref, 0.9, 0.5, training
        )
        assert out.indices.dtype == torch.int64 and out.indices.shape == (4, 5)
        assert torch.equal(out.indices, indices)
        torch.testing.assert_close(out.loss, loss)
        torch.testing.assert_close(out.quantized, quantized)
        torch.testing.assert_close(quantizer.codebook, codebook, atol=1e-6, rtol=0)
        torch.testing.assert_close(quantizer.cluster_size, cluster_size)
        (out.loss + out.quantized.sum()).backward()
        (loss + quantized.sum()).backward()
        torch.testing.assert_close(z.grad, z_ref.grad)
    if not training:
        torch.testing.assert_close(quantizer.codebook, codebook)  # eval: only usage moves
        assert cluster_size.sum() > 0


def test_no_gradient_parameters_fp32_under_autocast_and_lookup_is_pure():
    quantizer = NormEMAVectorQuantizer(codebook_size=32, code_dim=4)
    assert list(quantizer.parameters()) == []
    z = torch.randn(10, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.quantized.dtype == torch.float32
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    assert torch.equal(quantizer.lookup(z), nearest_code_indices(F.normalize(z.float(), dim=-1), quantizer.codebook))
    for name, buffer in quantizer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    with pytest.raises(ValueError, match="code_dim=4, got 5"):
        quantizer(torch.randn(3, 5))


def test_statistics():
    quantizer = NormEMAVectorQuantizer(codebook_size=4, code_dim=2).eval()
    quantizer.codebook.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    out = quantizer(torch.tensor([[1.0, 0.1], [0.1, 1], [2, 0.0], [0.1, 3]]))  # codes 0, 1, 0, 1
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))
    torch.testing.assert_close(out.codebook_usage, torch.tensor(0.5))
    assert int(out.num_dead_codes) == 2  # codes 2 and 3 never used since the (zero) start
    quantizer.reset_usage()
    assert quantizer.cluster_size.sum() == 0


def test_kmeans_init_runs_once_on_first_training_batch():
    quantizer = NormEMAVectorQuantizer(codebook_size=16, code_dim=4, kmeans_init=True)
    assert not quantizer.initted and quantizer.codebook.abs().sum() == 0
    z = torch.randn(200, 4)
    with pytest.raises(ValueError, match="k-means initialisation"):
        quantizer.eval()(z)
    assert not quantizer.initted  # eval never initialises
    quantizer.train()
    torch.manual_seed(3)
    quantizer(z)
    torch.manual_seed(3)
    centres, counts = cosine_kmeans(F.normalize(z, dim=-1), 16)
    assert quantizer.initted
    assert counts.sum() == 200
    # After init, one EMA step moves the codebook away from the centres only slightly.
    assert F.cosine_similarity(quantizer.codebook, centres).min() > 0.99
    snapshot = quantizer.codebook.clone()
    quantizer(z)
    assert F.cosine_similarity(quantizer.codebook, snapshot).min() > 0.99  # no second init


def _narrow_batches(steps, generator):
    # All vectors within a narrow cone around one direction: a random codebook collapses onto a few codes.
    direction = torch.zeros(8)
    direction[0] = 1.0
    return [direction + 0.1 * torch.randn(256, 8, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize(
    ("threshold", "min_usage", "max_usage"),
    [(0.0, 0.0, 0.05), (0.5, 0.6, 1.0)],
)
def test_dead_code_restart_recovers_usage_on_narrow_data(threshold, min_usage, max_usage):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    quantizer = NormEMAVectorQuantizer(codebook_size=128, code_dim=8, decay=0.9, dead_code_threshold=threshold)
    for batch in _narrow_batches(60, generator):
        out = quantizer(batch)
    quantizer.eval().reset_usage()
    usage = quantizer(_narrow_batches(1, generator)[0]).codebook_usage.item()
    print(f"dead_code_threshold={threshold}: codebook usage on a held-out narrow batch = {usage:.3f}")
    assert min_usage <= usage <= max_usage
    if threshold > 0:
        assert int(out.num_dead_codes) < 128


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        NormEMAVectorQuantizer(decay=1.0)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        NormEMAVectorQuantizer(dead_code_threshold=-1)


def test_tokenizing_before_the_kmeans_init_is_an_error():
    quantizer = NormEMAVectorQuantizer(codebook_size=16, code_dim=4, kmeans_init=True).eval()
    with pytest.raises(ValueError, match="k-means initialisation"):
        quantizer.lookup(torch.randn(8, 4))
    with pytest.raises(ValueError, match="k-means initialisation"):
        quantizer(torch.randn(8, 4))
    quantizer.train()(torch.randn(32, 4))  # the first training batch initialises it
    assert quantizer.eval().lookup(torch.randn(8, 4)).shape == (8,)


def test_initialisation_is_read_from_the_device_once():
    """A frozen tokenizer must not synchronise with the device on every call to read `initted`."""
    quantizer = NormEMAVectorQuantizer(codebook_size=8, code_dim=4, kmeans_init=False).eval()
    z = torch.randn(5, 4)
    quantizer.lookup(z)
    # Changing the buffer behind the module's back is not seen: the answer is cached on the host...
    quantizer.initted.fill_(False)
    quantizer.lookup(z)
    # ...until the state is reloaded or reset, which read it again.
    state = {**quantizer.state_dict(), "initted": torch.tensor(False)}
    quantizer.load_state_dict(state)
    with pytest.raises(ValueError, match="waiting for its k-means initialisation"):
        quantizer.lookup(z)
    quantizer.initted.fill_(True)
    quantizer.lookup(z)
    waiting = NormEMAVectorQuantizer(codebook_size=8, code_dim=4, kmeans_init=True)
    waiting.train()(z)  # the k-means init runs and sets the cached answer
    assert waiting._seen_initialised and bool(waiting.initted)
    waiting.reset_codebook()
    with pytest.raises(ValueError, match="waiting for its k-means initialisation"):
        waiting.eval().lookup(z)
