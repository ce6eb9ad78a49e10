"""Which cache blocks are free and which belong to which sequence. Plain Python, no tensors.

Blocks are reference-counted: ``fork`` gives a new sequence the blocks of another (the n samples
of one prompt share its prefilled blocks). A shared block is never written: the write that would
land in one first gets a private copy (copy-on-write), and ``grow`` returns the ``(src, dst)``
copies for the engine to apply to the latent cache before the step runs.
"""

from __future__ import annotations

from collections import deque

from latentmoe.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0, f"num_blocks={num_blocks} block_size={block_size}"
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_forked_blocks = 0  # blocks handed to a fork without a copy (cumulative)
        self.num_copied_blocks = 0  # copy-on-write copies (cumulative)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_shared_blocks(self) -> int:
        """Blocks held by more than one sequence right now."""
        return sum(r > 1 for r in self._refs)

    def _written(self, seq: Sequence, num_new_tokens: int) -> range:
        """Indices into the block table of the existing blocks the next ``num_new_tokens`` tokens write to."""
        first = seq.num_computed_tokens // self.block_size
        last = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return range(first, min(last, len(seq.block_table)))

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to take so the sequence's cache holds ``num_computed_tokens + num_new_tokens`` tokens:
        new ones, and copies of shared blocks the new tokens would write to."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        copies = sum(self._refs[seq.block_table[i]] > 1 for i in self._written(seq, num_new_tokens))
        return max(0, total - len(seq.block_table)) + copies

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Take the blocks; returns the ``(src, dst)`` block copies to make before the tokens are written."""
        n = self.blocks_needed(seq, num_new_tokens)
        assert n <= len(self._free), f"{seq}: needs {n} blocks, {len(self._free)} free"
        copies = []
        for i in self._written(seq, num_new_tokens):
            src = seq.block_table[i]
            if self._refs[src] > 1:
                dst = self._take()
                self._refs[src] -= 1
                seq.block_table[i] = dst
                copies.append((src, dst))
        self.num_copied_blocks += len(copies)
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        seq.block_table.extend(self._take() for _ in range(total - len(seq.block_table)))
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (and its computed tokens)."""
        assert not child.block_table, f"{child} already has blocks"
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._refs[block] += 1
        self.num_forked_blocks += len(child.block_table)

    def _take(self) -> int:
        block = self._free.popleft()
        assert self._refs[block] == 0, f"block {block} is free but has {self._refs[block]} references"
        self._refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            assert self._refs[block] > 0, f"double free of block {block} by {seq}"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        seq.block_table = []
        assert len(self._free) <= self.num_blocks, f"double free: {len(self._free)} > {self.num_blocks}"
