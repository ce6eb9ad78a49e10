"""Which cache blocks are free and which belong to which sequence. Plain Python, no tensors."""

from __future__ import annotations

from collections import deque

from latentmoe.cluster.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0, f"num_blocks={num_blocks} block_size={block_size}"
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the sequence's cache holds ``num_computed_tokens + num_new_tokens`` tokens."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        n = self.blocks_needed(seq, num_new_tokens)
        assert n <= len(self._free), f"{seq}: needs {n} blocks, {len(self._free)} free"
        seq.block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        assert len(self._free) <= self.num_blocks, f"double free: {len(self._free)} > {self.num_blocks}"
