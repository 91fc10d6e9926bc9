"""The rows of a fit: a feature matrix read in row chunks, optionally standardised on the fly and sharded over
processes, with every product the solvers need.

The matrix may be stored in any floating dtype (float16 or bfloat16 to halve its memory), memory-mapped, or
on another device than the solve: each chunk is converted to the solve dtype and device when it is used, so
the peak memory of a product is one chunk plus the small (classes x features) result, never a converted copy
of the whole matrix. A column of ones (the bias) is appended implicitly.

With a process group every process holds its own shard of the rows; a product's partial sums are gathered
from every rank and added in rank order, so every process gets bitwise the same result and the same data in
the same shards gives the same path on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Rows", "DEFAULT_CHUNK_BYTES", "DEFAULT_CACHE_BYTES"]

# A chunk converted to the solve dtype holds at most this many bytes: large enough that the GEMMs run at full
# speed, small enough that the transient copies of a product stay far below the matrix itself.
DEFAULT_CHUNK_BYTES = 128 << 20
# Rows that need converting (another dtype or device, a row subset, standardisation) are converted once and
# kept when all of them take at most this many bytes; larger ones are converted chunk by chunk at every use.
DEFAULT_CACHE_BYTES = 1 << 30
# A reduction whose temporary is as large as its input (a square, a float64 copy) reads the chunks in blocks
# of this share of a chunk, so that the temporary stays small beside the chunk.
_TEMPORARY_SHARE = 4


class Rows:
    """A (local shard of a) feature matrix as row chunks in the solve dtype, with a column of ones appended.

    Args:
        X: n x F features in any floating dtype, on any device (e.g. a memory-mapped float16 tensor).
        index: local row indices to use (e.g. a training split), default all rows in order.
        shift, scale: per-column statistics; chunks are ``(X - shift) / scale``, computed in the solve dtype.
        dtype: the solve dtype every product computes and accumulates in.
        device: the device to solve on, default ``X``'s.
        chunk_rows: rows per chunk, default what fits in :data:`DEFAULT_CHUNK_BYTES`.
        cache_bytes: keep the converted rows when they take at most this many bytes (a small problem then pays
            the conversion once); above it every chunk is converted into one reused buffer, so that memory
            stays bounded by one chunk.
        process_group: the processes holding the other shards; ``None`` for a single process.
    """

    def __init__(
        self,
        X: Tensor,
        *,
        index: Tensor | None = None,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        chunk_rows: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows}")
        self.X = X
        self.device = torch.device(device) if device is not None else X.device
        self.index = index.to(X.device) if index is not None else None
        self.shift = shift.to(device=self.device, dtype=dtype) if shift is not None else None
        self.scale = scale.to(device=self.device, dtype=dtype) if scale is not None else None
        self.dtype = dtype
        self.process_group = process_group
        self.chunk_rows_requested = chunk_rows
        self.n = int(self.index.numel()) if self.index is not None else X.shape[0]
        self.num_columns = X.shape[1]
        itemsize = torch.finfo(dtype).bits // 8
        self.chunk_rows = chunk_rows or max(1, DEFAULT_CHUNK_BYTES // (itemsize * max(self.num_columns, 1)))
        views = index is None and shift is None and scale is None and X.dtype == dtype and X.device == self.device
        fits = self.n * self.num_columns * itemsize <= cache_bytes
        self._cache = [chunk for _, chunk in self._convert(reuse=False)] if fits and not views else None
        self.n_total = int(self.sum(torch.tensor(float(self.n), dtype=torch.float64, device=self.device)))

    # -- reductions over the processes -----------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """The number of processes sharing the rows."""
        return dist.get_world_size(self.process_group) if self.process_group is not None else 1

    def sum(self, partial: Tensor) -> Tensor:
        """``partial`` summed over the processes, in rank order: the same bits on every rank and every run."""
        if self.world_size == 1:
            return partial
        parts = [torch.empty_like(partial) for _ in range(self.world_size)]
        dist.all_gather(parts, partial.contiguous(), group=self.process_group)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def amax(self, partial: Tensor) -> Tensor:
        """``partial``'s elementwise maximum over the processes (exact, so in any order)."""
        if self.world_size > 1:
            partial = partial.clone()
            dist.all_reduce(partial, op=dist.ReduceOp.MAX, group=self.process_group)
        return partial

    # -- the rows --------------------------------------------------------------------------------------------

    def chunks(self, max_rows: int | None = None) -> Iterator[tuple[slice, Tensor]]:
        """``(local row slice, chunk)`` pairs covering the rows in order, each chunk in the solve dtype; with
        ``max_rows`` the chunks are split further into views of at most that many rows.

        A chunk is valid until the next one is read (converted chunks share one buffer): copy what must outlive
        the loop.
        """
        stored = self._convert(reuse=True) if self._cache is None else zip(self._starts(), self._cache)
        for rows, chunk in stored:
            if max_rows is None or chunk.shape[0] <= max_rows:
                yield rows, chunk
                continue
            for start in range(0, chunk.shape[0], max_rows):
                block = chunk[start : start + max_rows]
                yield slice(rows.start + start, rows.start + start + block.shape[0]), block

    def _starts(self) -> Iterator[slice]:
        """The local row slices of the stored chunks."""
        for start in range(0, self.n, self.chunk_rows):
            yield slice(start, min(start + self.chunk_rows, self.n))

    @property
    def temporary_rows(self) -> int:
        """Rows per block of a reduction that forms a temporary as large as its block (see ``chunks``)."""
        return max(1, self.chunk_rows // _TEMPORARY_SHARE)

    def _convert(self, reuse: bool) -> Iterator[tuple[slice, Tensor]]:
        """The chunks, each gathered, converted and standardised now; with ``reuse`` all into one buffer (the
        previous chunk is overwritten), otherwise each into memory of its own."""
        standardise = self.shift is not None or self.scale is not None
        as_stored = self.X.dtype == self.dtype and self.X.device == self.device
        buffer = staging = None
        for rows in self._starts():
            if not reuse:
                chunk = self.X[rows] if self.index is None else self.X.index_select(0, self.index[rows])
                # In place only on a copy: a plain view of X must stay untouched.
                converted = chunk.to(device=self.device, dtype=self.dtype, copy=self.index is None)
            elif self.index is None and as_stored and not standardise:
                converted = self.X[rows]
            else:
                # One reused buffer: a fresh one per chunk costs its page faults at every pass, and interleaved
                # with the small blocks of a product it fragments the heap, which then keeps growing.
                if buffer is None:
                    buffer = torch.empty(self.chunk_rows, self.num_columns, dtype=self.dtype, device=self.device)
                converted = buffer[: rows.stop - rows.start]
                if self.index is None:
                    converted.copy_(self.X[rows])
                elif as_stored:
                    torch.index_select(self.X, 0, self.index[rows], out=converted)
                else:
                    # Gathered a block at a time: a gathered copy of the whole chunk would add another half
                    # chunk (float16) to every pass.
                    if staging is None:
                        staging = self.X.new_empty(self.temporary_rows, self.num_columns)
                    for start in range(rows.start, rows.stop, self.temporary_rows):
                        part = self.index[start : min(start + self.temporary_rows, rows.stop)]
                        gathered = torch.index_select(self.X, 0, part, out=staging[: part.numel()])
                        converted[start - rows.start : start - rows.start + part.numel()].copy_(gathered)
            if standardise:
                if self.shift is not None:
                    converted.sub_(self.shift)
                if self.scale is not None:
                    converted.div_(self.scale)
            yield rows, converted

    def gather_columns(self, cols: Tensor, out: Tensor | None = None) -> Tensor:
        """The n x len(cols) values of the feature columns ``cols`` in the solve dtype, standardised, written into
        ``out`` if given; only those columns are read and converted, never whole chunks."""
        cols = cols.to(self.device)
        if out is None:
            out = torch.empty(self.n, cols.numel(), dtype=self.dtype, device=self.device)
        if self._cache is not None:
            for rows, chunk in zip(self._starts(), self._cache):
                out[rows] = chunk.index_select(1, cols)
            return out
        stored = cols.to(self.X.device)
        for rows in self._starts():
            if self.index is None:
                out[rows] = self.X[rows].index_select(1, stored)
            else:
                out[rows] = self.X[self.index[rows, None], stored]
        # The same elementwise operations as a converted chunk's, so the values are bitwise the same.
        if self.shift is not None:
            out.sub_(self.shift[cols])
        if self.scale is not None:
            out.div_(self.scale[cols])
        return out

    def columns(self, cols: Tensor, values: Tensor | None = None) -> Rows:
        """The same rows on the feature columns ``cols`` only, held in the solve dtype (a small matrix);
        ``values`` are those columns' values (:meth:`gather_columns`) where the caller holds them already."""
        values = self.gather_columns(cols) if values is None else values
        # A requested chunk size carries over; the default one is sized for the narrower block.
        return Rows(values, dtype=self.dtype, chunk_rows=self.chunk_rows_requested, process_group=self.process_group)

    # -- products with the parameters ------------------------------------------------------------------------

    def logits(self, theta: Tensor) -> Tensor:
        """The local n x C logits ``[X | 1] @ theta.T`` of the parameters ``theta = [W | b]``."""
        weight, bias = theta[:, :-1], theta[:, -1]
        out = None
        for rows, chunk in self.chunks():
            z = torch.addmm(bias, chunk, weight.t())
            if rows.start == 0 and rows.stop == self.n:
                return z
            if out is None:
                out = z.new_empty(self.n, theta.shape[0])
            out[rows] = z
        return out if out is not None else theta.new_zeros(0, theta.shape[0])

    def residual_product(
        self,
        residual: Callable[[slice, Tensor], Tensor],
        num_classes: int,
        *,
        square: bool = False,
        max_rows: int | None = None,
    ) -> Tensor:
        """``R^T [X | 1]`` (``R^T [X^2 | 1]`` with ``square``) over all processes' rows, C x (F + 1), where the
        n x C matrix ``R`` is only ever formed block by block: ``residual(rows, block)`` gives its rows ``rows``
        from the chunk ``block`` of at most ``max_rows`` rows."""
        weights = torch.zeros(num_classes, self.num_columns, dtype=self.dtype, device=self.device)
        bias = torch.zeros(num_classes, dtype=self.dtype, device=self.device)
        if square:
            max_rows = min(max_rows or self.chunk_rows, self.temporary_rows)
        for rows, block in self.chunks(max_rows):
            r = residual(rows, block)
            weights.addmm_(r.t(), block.square() if square else block)
            bias += r.sum(dim=0)
        return self.sum(torch.cat([weights, bias[:, None]], dim=1))

    def class_sums(self, y: Tensor, num_classes: int) -> Tensor:
        """``Y^T [X | 1]`` for the one-hot labels ``y``: per class, the sum of its rows and its count."""
        sums = torch.zeros(num_classes, self.num_columns + 1, dtype=self.dtype, device=self.device)
        for rows, chunk in self.chunks():
            sums[:, :-1].index_add_(0, y[rows], chunk)
        sums[:, -1] = torch.bincount(y, minlength=num_classes).to(self.dtype)
        return self.sum(sums)

    def gram_product(self, u: Tensor) -> Tensor:
        """``[X | 1]^T [X | 1] u`` over all processes' rows, for a vector ``u`` of F + 1 entries."""
        out = u.new_zeros(self.num_columns + 1)
        for _, chunk in self.chunks():
            t = torch.addmv(u[-1:].expand(chunk.shape[0]), chunk, u[:-1])
            out[:-1].addmv_(chunk.t(), t)
            out[-1] += t.sum()
        return self.sum(out)

    def square_mean(self) -> Tensor:
        """Mean over all rows of the squared entries of ``[X | 1]``, per column."""
        sums = torch.zeros(self.num_columns + 1, dtype=self.dtype, device=self.device)
        self._column_sums(lambda block: block.square().sum(dim=0), sums[:-1])
        sums[-1] = self.n
        return self.sum(sums) / self.n_total

    def abs_max(self) -> float:
        """The largest magnitude in ``[X | 1]`` over all processes' rows."""
        top = torch.ones((), dtype=self.dtype, device=self.device)
        for _, chunk in self.chunks():
            low, high = torch.aminmax(chunk)
            top = torch.maximum(top, torch.maximum(-low, high))
        return float(self.amax(top))

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Per-column mean and population (divide by N) std over all processes' rows, in float64, two passes."""
        # A sum to float64 converts its whole input first, and the spread squares a float64 copy in place: each
        # holds one float64 copy of a block at a time.
        total = torch.zeros(self.num_columns, dtype=torch.float64, device=self.device)
        mean = self.sum(self._column_sums(lambda block: block.sum(dim=0, dtype=torch.float64), total)) / self.n_total
        spread = self._column_sums(
            lambda block: block.to(torch.float64, copy=True).sub_(mean).square_().sum(dim=0), torch.zeros_like(mean)
        )
        return mean, (self.sum(spread) / self.n_total).sqrt()

    def _column_sums(self, per_block: Callable[[Tensor], Tensor], total: Tensor) -> Tensor:
        """``total`` plus ``per_block(block)`` summed over the local rows, read in blocks of
        :attr:`temporary_rows` rows (in a function of its own, so that no block outlives the pass: a block is a
        view of the pass's buffer, which would otherwise stay allocated beside the next pass's)."""
        for _, block in self.chunks(self.temporary_rows):
            total += per_block(block)
        return total
