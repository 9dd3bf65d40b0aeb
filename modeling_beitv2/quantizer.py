"""The l2-normalised EMA vector quantizer of the VQ-KD tokenizer (BEiT v2), written for memory and multi-GPU use.

Compared with the reference implementation (unilm `beit2/norm_ema_quantizer.py`) it gives the same codes and the
same codebook update, but:

* nearest codes come from chunked matmuls, and the EMA update from `bincount`/`index_add_` — no one-hot
  `(num_vectors, codebook_size)` matrix and no full `(num_vectors, codebook_size)` distance matrix is ever built;
* under `torch.distributed`, k-means init runs once on the batch gathered from all ranks and is broadcast (the
  reference initialises every rank from its own local batch, so ranks start from different codebooks);
* an optional dead-code restart re-seeds rarely used codes from vectors of the current (global) batch;
* per-step usage statistics are returned with every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

# Rows of `z` compared with the whole codebook at once: 4096 x 8192 fp32 similarities = 128 MiB.
DEFAULT_CHUNK_SIZE = 4096


@dataclass
class QuantizerOutput(ModelOutput):
    """
    Output of [`NormEMAVectorQuantizer`].

    Args:
        quantized (`torch.FloatTensor` of shape `(..., code_dim)`):
            The chosen codes, with straight-through gradients to the (l2-normalised) input.
        indices (`torch.LongTensor` of shape `(...)`):
            Index of the chosen code for every input vector.
        loss (`torch.FloatTensor` of shape `()`):
            Commitment loss `beta * mse(code, z)` (gradient to `z` only).
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the code histogram of this step's batch (all ranks).
        codebook_usage (`torch.FloatTensor` of shape `()`):
            Fraction of codes chosen at least once in this step's batch (all ranks).
        num_dead_codes (`torch.LongTensor` of shape `()`):
            Codes whose EMA usage `cluster_size` is below `dead_code_threshold` before this step's restart, or, when
            the restart is off, codes never used since the usage statistics were last reset (the reference's
            "unused codes").
    """

    quantized: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    codebook_usage: torch.Tensor | None = None
    num_dead_codes: torch.Tensor | None = None


def _distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate `rows` (n_rank, d) of every rank in rank order; ranks may hold different numbers of rows."""
    world_size = _distributed_world_size()
    if world_size == 1:
        return rows
    local_count = torch.tensor([rows.shape[0]], device=rows.device)
    gathered_counts = [torch.zeros_like(local_count) for _ in range(world_size)]
    dist.all_gather(gathered_counts, local_count)
    counts = [int(count) for count in gathered_counts]
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:count] for chunk, count in zip(gathered, counts)])


def _broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def nearest_code_indices(
    vectors: torch.Tensor, codebook: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Index of the most cosine-similar row of `codebook` for each row of `vectors`.

    Both inputs are l2-normalised, so this is also the Euclidean nearest code (the reference's criterion). The
    similarity matrix is built `chunk_size` rows at a time.

    Args:
        vectors (`torch.Tensor` of shape `(num_vectors, code_dim)`)
        codebook (`torch.Tensor` of shape `(codebook_size, code_dim)`)

    Returns:
        `torch.LongTensor` of shape `(num_vectors,)`.
    """
    return torch.cat([(chunk @ codebook.T).argmax(dim=1) for chunk in vectors.split(chunk_size)])


def cosine_kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int = 10, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means as used by the reference k-means codebook init.

    Starts from `num_clusters` random samples (with replacement when there are fewer samples than clusters),
    then alternates nearest-centre assignment and l2-normalised means; a centre that attracts no sample keeps
    its position. Uses the global torch RNG.

    Args:
        samples (`torch.Tensor` of shape `(num_samples, dim)`): l2-normalised vectors.

    Returns:
        The l2-normalised centres `(num_clusters, dim)` and the sample count of each in the last assignment
        `(num_clusters,)`.
    """
    num_samples = samples.shape[0]
    if num_samples >= num_clusters:
        start = torch.randperm(num_samples, device=samples.device)[:num_clusters]
    else:
        start = torch.randint(0, num_samples, (num_clusters,), device=samples.device)
    centres = samples[start]
    counts = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        assignment = nearest_code_indices(samples, centres, chunk_size)
        counts = torch.bincount(assignment, minlength=num_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, samples)
        new_centres = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=-1)
        centres = torch.where((counts == 0).unsqueeze(1), centres, new_centres)
    return centres, counts


class NormEMAVectorQuantizer(nn.Module):
    r"""
    Vector quantizer with an l2-normalised codebook updated by exponential moving averages (VQ-KD, BEiT v2).

    The input is l2-normalised; its nearest code (highest cosine similarity) is chosen; the output is the code
    with straight-through gradients; the loss is the commitment term only (the codebook is never trained by
    gradients). In training mode each call updates the codebook like the reference:

    ```
    counts  = histogram of chosen codes                (summed over ranks)
    sums    = per-code sum of the assigned vectors     (summed over ranks)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    means   = l2norm(sums / counts), or the current code where counts == 0
    codebook = l2norm(decay * codebook + (1 - decay) * means)
    ```

    In eval mode only `cluster_size` moves. Everything runs in fp32 with autocast off.

    Buffers: `codebook` `(codebook_size, code_dim)`, `cluster_size` `(codebook_size,)` (EMA of per-step usage counts),
    `initted` `()` (whether the k-means init has run).

    Args:
        codebook_size (`int`): size of the codebook.
        code_dim (`int`): dimension of each code.
        decay (`float`): EMA decay of the codebook and of the usage statistics.
        beta (`float`): weight of the commitment loss.
        kmeans_init (`bool`): initialise the codebook with 10 iterations of cosine k-means on the first training
            batch (gathered from all ranks, run on rank 0 and broadcast), and `cluster_size` with the k-means
            cluster sizes (the reference stores them in an unused buffer; here they give the dead-code rule a fair
            start). Otherwise random unit vectors.
        dead_code_threshold (`float`): when positive, after each training update the codes whose `cluster_size` is
            below it are re-seeded with random vectors of the current global batch and their `cluster_size` is set
            to the threshold. `cluster_size` is measured in vectors per step, so `1.0` means "chosen less than about
            once per step". 0 disables the restart (the reference behaviour).
        kmeans_iters (`int`): iterations of the k-means init.
        chunk_size (`int`): rows of the input compared with the whole codebook at once.
        dtype (`torch.dtype`, *optional*): of the float buffers (the default dtype when `None`); the VQ-KD
            tokenizer asks for fp32, whatever the default.
    """

    # Buffers (registered in `__init__`).
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    initted: torch.Tensor

    def __init__(
        self,
        codebook_size: int = 8192,
        code_dim: int = 32,
        decay: float = 0.99,
        beta: float = 1.0,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        kmeans_iters: int = 10,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}.")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}.")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.beta = beta
        self.kmeans_init = kmeans_init
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.chunk_size = chunk_size
        self.register_buffer("codebook", torch.empty(codebook_size, code_dim, dtype=dtype))
        self.register_buffer("cluster_size", torch.zeros(codebook_size, dtype=dtype))
        self.register_buffer("initted", torch.tensor(False))
        # Host-side copy of `initted` once it has been seen True (see `_is_initialised`).
        self._seen_initialised = False
        self.reset_codebook()

    def reset_codebook(self) -> None:
        """Random unit codes (or zeros awaiting k-means), zero usage; respects values loaded by `from_pretrained`."""
        if self.kmeans_init:
            init.zeros_(self.codebook)
        else:
            init.copy_(self.codebook, F.normalize(torch.randn_like(self.codebook), dim=-1))
        init.zeros_(self.cluster_size)
        init.copy_(self.initted, torch.tensor(not self.kmeans_init))
        self._seen_initialised = False

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero the usage statistics (e.g. before an evaluation pass that counts unused codes)."""
        self.cluster_size.zero_()

    def _is_initialised(self) -> bool:
        # Reading the buffer synchronises with the device (a stall every step for a frozen tokenizer on a GPU, and a
        # graph break under torch.compile). Once True it only turns False again through `reset_codebook` or a state
        # dict, which reset the cached answer.
        if not self._seen_initialised:
            self._seen_initialised = bool(self.initted)
        return self._seen_initialised

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._seen_initialised = False
        super()._load_from_state_dict(*args, **kwargs)

    def _check_initialised(self) -> None:
        if not self._is_initialised():
            raise ValueError(
                "The codebook is still waiting for its k-means initialisation (kmeans_init=True), which runs on the "
                "first training batch; run a training step or load a trained tokenizer before tokenizing."
            )

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code indices for `z` of shape `(..., code_dim)`, without touching any statistic."""
        self._check_initialised()
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = F.normalize(z.float().reshape(-1, self.code_dim), dim=-1)
            return nearest_code_indices(flat, self.codebook.float(), self.chunk_size).view(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """
        Args:
            z (`torch.Tensor` of shape `(..., code_dim)`): vectors to quantize (any float dtype).

        Returns:
            [`QuantizerOutput`] with `quantized` in fp32.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"Expected the last dimension of z to be code_dim={self.code_dim}, got {z.shape[-1]}.")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            flat = z.reshape(-1, self.code_dim)
            if self.training and not self._is_initialised():
                self._kmeans_init(flat.detach())
            self._check_initialised()
            codebook = self.codebook.float()  # a no-op unless the whole model was cast to half precision
            indices = nearest_code_indices(flat.detach(), codebook, self.chunk_size)
            codes = codebook[indices].view(z.shape)  # gathered before the update, as in the reference
            loss = self.beta * F.mse_loss(codes, z)
            quantized = z + (codes - z).detach()
            stats = self._update(flat.detach(), indices)
        return QuantizerOutput(quantized=quantized, indices=indices.view(z.shape[:-1]), loss=loss, **stats)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        samples = _all_gather_rows(flat)
        if _distributed_world_size() == 1 or dist.get_rank() == 0:
            centres, counts = cosine_kmeans(samples, self.codebook_size, self.kmeans_iters, self.chunk_size)
            self.codebook.copy_(centres)
            self.cluster_size.copy_(counts)
        _broadcast_from_rank0(self.codebook)
        _broadcast_from_rank0(self.cluster_size)
        self.initted.fill_(True)
        self._seen_initialised = True

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        world_size = _distributed_world_size()
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)
        if self.training:
            sums = flat.new_zeros(self.codebook_size, self.code_dim).index_add_(0, indices, flat)
            # One all-reduce for both: sums in the first code_dim columns, counts in the last.
            reduced = torch.cat([sums, counts.unsqueeze(1)], dim=1)
            if world_size > 1:
                dist.all_reduce(reduced)
            sums, counts = reduced[:, :-1], reduced[:, -1]
        elif world_size > 1:
            dist.all_reduce(counts)

        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.training:
            unused = counts == 0
            means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=-1)
            means = torch.where(unused.unsqueeze(1), self.codebook, means)
            self.codebook.mul_(self.decay).add_(means, alpha=1 - self.decay)
            self.codebook.copy_(F.normalize(self.codebook, dim=-1))

        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold
            if self.training and dead.any():
                self._restart_codes(flat, dead)
        else:
            dead = self.cluster_size == 0

        probabilities = counts / counts.sum().clamp(min=1)
        entropy = -(probabilities * torch.log(probabilities.clamp(min=1e-12))).sum()
        return {
            "perplexity": entropy.exp(),
            "codebook_usage": (counts > 0).float().mean(),
            "num_dead_codes": dead.sum(),
        }

    def _restart_codes(self, flat: torch.Tensor, dead: torch.Tensor) -> None:
        # The dead set is identical on all ranks (cluster_size is), and rank 0 picks the replacement rows of the
        # gathered batch, so every rank writes the same vectors.
        samples = _all_gather_rows(flat)
        num_dead = int(dead.sum())
        if samples.shape[0] >= num_dead:
            chosen = torch.randperm(samples.shape[0], device=samples.device)[:num_dead]
        else:
            chosen = torch.randint(0, samples.shape[0], (num_dead,), device=samples.device)
        chosen = _broadcast_from_rank0(chosen)
        self.codebook[dead] = samples[chosen]
        self.cluster_size[dead] = self.dead_code_threshold
