"""The chunked PyTorch path for CPU tensors: the same semantics as the Triton kernels.

Rows are processed in chunks, and each chunk sweeps the vocabulary in tiles whose logits fit
in `chunk_bytes` together: no [rows, V] buffer ever exists, and the head is read once per
chunk of rows, not once per handful of rows. Each tile updates a running max and the mass of
every non-target entry (an online logsumexp, as the GPU kernels do), for the policy, the
reference and the extrapolated logits alike.

Unlike the GPU kernels this path reaches the 6·N·H·V FLOP floor of a frozen head: the forward
also forms each token's input-gradient direction

    d_i = (1 - p_i[y_i]) · W[y_i] - sum_{v != y_i} p_i[v] · W[v]

accumulating the sum tile by tile (rescaled when the running max moves, as flash attention
accumulates its output), and the backward only scales it by the upstream gradient — no logits
recompute. A trainable head recomputes the logits in the backward for dW (its direction
depends on the upstream gradient of every token).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 32 * 2**20
_WEIGHT_SLICE_BYTES = 16 * 2**20  # a 16-bit head is upcast tile by tile, never whole
# Narrower tiles make small matmuls; more rows per chunk is then the better use of the budget.
_MIN_TILE_COLUMNS = 1024


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tile_shape(rows: int, vocab: int, hidden: int, buffers: int, itemsize: int, chunk_bytes: int,
               upcast: bool) -> tuple[int, int]:  # fmt: skip
    """(rows per chunk, vocabulary columns per tile) for `buffers` logits tiles within `chunk_bytes`.

    All rows in one chunk when a tile of them is at least `_MIN_TILE_COLUMNS` wide (the head is
    then read once); otherwise tiles of that width and as many rows as fit. A head stored in
    another dtype is upcast one tile at a time, so the tile is also kept to `_WEIGHT_SLICE_BYTES`.
    """
    row_bytes = buffers * itemsize
    widest = vocab
    if upcast:
        widest = max(1, min(vocab, _WEIGHT_SLICE_BYTES // (hidden * itemsize)))
    columns = max(1, chunk_bytes // (max(rows, 1) * row_bytes), min(_MIN_TILE_COLUMNS, chunk_bytes // row_bytes))
    columns = min(columns, widest)
    return max(1, min(rows, chunk_bytes // (columns * row_bytes))), columns


def _head_tile(weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int, dtype: torch.dtype):
    tile = weight[start:stop]
    return tile.to(dtype), None if bias is None else bias[start:stop].to(dtype)


def _tile_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.matmul(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


def _targets_in_tile(targets: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' targets fall in vocabulary columns [start, stop), and their column there
    ([rows, 1], clamped into the tile for the others, whose value is then left unused)."""
    return (targets >= start) & (targets < stop), (targets - start).clamp_(0, stop - start - 1)[:, None]


class _OnlineTargetSoftmax:
    """Log-softmax at the target of a chunk of rows, fed one vocabulary tile at a time.

    The target's own mass is kept apart from the others' so that 1 - p[target] is a sum of
    small terms, exact even when p[target] -> 1. Every logits kind goes through the same
    operations, so extrapolation with lam = 0 reproduces the policy bit for bit.
    """

    def __init__(self, rows: int, like: torch.Tensor):
        self.row_max = like.new_full((rows,), float("-inf"))
        self.others_mass = like.new_zeros(rows)
        self.target_logit = like.new_zeros(rows)

    def add_tile(self, logits: torch.Tensor, local_target: torch.Tensor, in_tile: torch.Tensor) -> torch.Tensor:
        """Overwrite `logits` with exp(logits - max), the target zeroed; return the old sums' rescale."""
        at_target = logits.gather(1, local_target)
        self.target_logit = torch.where(in_tile, at_target.squeeze(1), self.target_logit)
        new_max = torch.maximum(self.row_max, logits.amax(dim=1))
        rescale = (self.row_max - new_max).exp()
        mass = logits.sub_(new_max[:, None]).exp_()
        mass.scatter_(1, local_target, mass.gather(1, local_target).masked_fill_(in_tile[:, None], 0.0))
        self.others_mass = self.others_mass * rescale + mass.sum(dim=1)
        self.row_max = new_max
        return rescale

    def total_mass(self) -> torch.Tensor:
        return self.others_mass + (self.target_logit - self.row_max).exp()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p[target], logsumexp of the row, logsumexp without the target)."""
        lse = self.row_max + self.total_mass().log()
        return self.target_logit - lse, lse, self.row_max + self.others_mass.log()


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Active rows in, per-row (policy, reference, extrapolated) log-probs out (see triton_logprobs)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, targets, extrapolate,
        want_hidden_grad, chunk_bytes,
    ):  # fmt: skip
        dtype = compute_dtype(hidden)
        itemsize = torch.finfo(dtype).bits // 8
        num_rows, vocab, hidden_size = rows.numel(), weight.shape[0], weight.shape[1]
        has_ref = ref_hidden is not None
        ref_weight = weight if ref_weight is None else ref_weight
        lam = None if extrapolate is None else float(extrapolate)
        buffers = 1 + has_ref + (lam is not None)
        upcast = weight.dtype != dtype or (has_ref and ref_weight.dtype != dtype)
        same_head = ref_weight is weight and ref_bias is bias
        row_step, tile = tile_shape(num_rows, vocab, hidden_size, buffers, itemsize, chunk_bytes, upcast)

        policy = hidden.new_empty(num_rows, dtype=dtype)
        lse_all = hidden.new_empty(num_rows, dtype=dtype)
        others_all = hidden.new_empty(num_rows, dtype=dtype)
        reference = hidden.new_empty(num_rows if has_ref else 0, dtype=dtype)
        extrapolated = hidden.new_empty(num_rows if lam is not None else 0, dtype=dtype)
        direction = hidden.new_zeros(num_rows, hidden_size, dtype=dtype) if want_hidden_grad else None
        tiles = hidden.new_empty(buffers, min(row_step, num_rows), tile, dtype=dtype)

        for start in range(0, num_rows, row_step):
            chunk = slice(start, min(num_rows, start + row_step))
            idx, tgt = rows[chunk], targets[chunk].long()
            h = hidden[idx].to(dtype)
            ref_h = ref_hidden[idx].to(dtype) if has_ref else None
            size = h.shape[0]
            soft = _OnlineTargetSoftmax(size, h)
            ref_soft = _OnlineTargetSoftmax(size, h) if has_ref else None
            ext_soft = _OnlineTargetSoftmax(size, h) if lam is not None else None
            acc = direction[chunk] if want_hidden_grad else None  # sum_v exp(z_v - max) W[v], in place

            for v0 in range(0, vocab, tile):
                v1 = min(vocab, v0 + tile)
                in_tile, local_target = _targets_in_tile(tgt, v0, v1)
                w, b = _head_tile(weight, bias, v0, v1, dtype)
                logits = _tile_logits(h, w, b, tiles[0, :size, : v1 - v0])
                if has_ref:
                    rw, rb = (w, b) if same_head else _head_tile(ref_weight, ref_bias, v0, v1, dtype)
                    ref_logits = _tile_logits(ref_h, rw, rb, tiles[1, :size, : v1 - v0])
                    if lam is not None:  # (1 + lam) * z - lam * z_ref
                        ext_logits = torch.mul(ref_logits, -lam, out=tiles[2, :size, : v1 - v0])
                        ext_soft.add_tile(ext_logits.add_(logits, alpha=1 + lam), local_target, in_tile)
                    ref_soft.add_tile(ref_logits, local_target, in_tile)
                rescale = soft.add_tile(logits, local_target, in_tile)
                if want_hidden_grad:
                    acc.mul_(rescale[:, None]).addmm_(logits, w)

            policy[chunk], lse_all[chunk], others_all[chunk] = soft.finish()
            if has_ref:
                reference[chunk] = ref_soft.finish()[0]
            if lam is not None:
                extrapolated[chunk] = ext_soft.finish()[0]
            if want_hidden_grad:
                total_mass = soft.total_mass()
                others_share = soft.others_mass / total_mass
                acc.div_(-total_mass[:, None]).addcmul_(weight[tgt].to(dtype), others_share[:, None])
        del tiles

        ctx.mark_non_differentiable(reference, extrapolated)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse_all, others_all, direction)
        ctx.chunk_bytes = chunk_bytes
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return policy.to(out_dtype), reference.to(out_dtype), extrapolated.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_policy, _grad_reference, _grad_extrapolated):
        hidden, weight, bias, rows, targets, lse, others_lse, direction = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = compute_dtype(hidden)
        upstream = grad_policy.to(dtype)

        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            grad_hidden.index_copy_(0, rows, direction * upstream[:, None])
            grad_hidden = grad_hidden.to(hidden.dtype)

        grad_weight = grad_bias = None
        if need_weight or need_bias:
            num_rows, (vocab, hidden_size) = rows.numel(), weight.shape
            grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_bias else None
            row_step, tile = tile_shape(num_rows, vocab, hidden_size, 1, torch.finfo(dtype).bits // 8,
                                        ctx.chunk_bytes, weight.dtype != dtype)  # fmt: skip
            buffer = hidden.new_empty(min(row_step, num_rows), tile, dtype=dtype)
            for start in range(0, num_rows, row_step):
                chunk = slice(start, min(num_rows, start + row_step))
                h = hidden[rows[chunk]].to(dtype)
                tgt = targets[chunk].long()
                target_share = (others_lse[chunk] - lse[chunk]).exp()  # d log p[y] / d z[y] = 1 - p[y]
                scale = upstream[chunk, None]
                for v0 in range(0, vocab, tile):
                    v1 = min(vocab, v0 + tile)
                    w, b = _head_tile(weight, bias, v0, v1, dtype)
                    grad_logits = _tile_logits(h, w, b, buffer[: h.shape[0], : v1 - v0])
                    grad_logits.sub_(lse[chunk, None]).exp_().neg_()
                    in_tile, local_target = _targets_in_tile(tgt, v0, v1)
                    at_target = torch.where(
                        in_tile[:, None], target_share[:, None], grad_logits.gather(1, local_target)
                    )
                    grad_logits.scatter_(1, local_target, at_target).mul_(scale)
                    if need_weight:
                        grad_weight[v0:v1].addmm_(grad_logits.T, h)
                    if need_bias:
                        grad_bias[v0:v1] += grad_logits.sum(dim=0)
            grad_weight = grad_weight.to(weight.dtype) if need_weight else None
            grad_bias = grad_bias.to(bias.dtype) if need_bias else None

        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None
