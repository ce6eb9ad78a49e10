"""The paged MLA latent cache: per layer, blocks of ``block_size`` tokens of ``[c_kv | k_pe]``.

Nothing else is cached: ``kv_lora_rank + qk_rope_head_dim`` values per token per layer.
Which blocks belong to which sequence is the block manager's business (plain Python);
this class only holds the tensor and writes into slots.
"""

from __future__ import annotations

import torch

from latentmoe.model.config import ModelConfig


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the cache will live: the GPU's free memory, or MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass cache_bytes or num_blocks")


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return config.latent_dim * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, *, cache_bytes: int | None = None,
                          memory_fraction: float | None = None, device: torch.device = torch.device("cpu")) -> int:
    """Blocks that fit a budget given in bytes, or as a fraction of the device's available memory."""
    if (cache_bytes is None) == (memory_fraction is None):
        raise ValueError("give exactly one of cache_bytes and memory_fraction")
    if memory_fraction is not None:
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        cache_bytes = int(available_memory_bytes(device) * memory_fraction)
    num_blocks = cache_bytes // (block_size * bytes_per_token(config, dtype))
    if num_blocks < 1:
        raise ValueError(f"a cache budget of {cache_bytes} bytes holds no block of {block_size} tokens "
                         f"({bytes_per_token(config, dtype)} bytes per token)")
    return int(num_blocks)


class LatentCache:
    """``kv [layers, num_blocks, block_size, kv_lora_rank + rope]``; slot = block * block_size + offset."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.kv_lora_rank = config.kv_lora_rank
        self.kv = torch.empty(config.num_hidden_layers, num_blocks, block_size, config.latent_dim,
                              dtype=dtype, device=device)
        self.bytes_per_token = bytes_per_token(config, dtype)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the latents of tokens ``[T]`` at flat ``slots [T]``."""
        flat = self.kv[layer].view(-1, self.kv.shape[-1])  # [num_blocks * block_size, R + P]
        flat[slots, : self.kv_lora_rank] = c_kv.to(self.dtype)
        flat[slots, self.kv_lora_rank :] = k_pe.to(self.dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block ``dst`` gets the contents of ``src``, in every layer."""
        if copies:
            src, dst = (torch.tensor(c, device=self.kv.device) for c in zip(*copies))
            self.kv[:, dst] = self.kv[:, src]

    def gather(self, layer: int, block_table: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``num_tokens`` latents: ``c_kv [S, R]``, ``k_pe [S, P]``."""
        num_blocks = -(-num_tokens // self.block_size)
        blocks = torch.as_tensor(block_table[:num_blocks], device=self.kv.device)
        latents = self.kv[layer, blocks].flatten(0, 1)[:num_tokens]
        return latents[:, : self.kv_lora_rank], latents[:, self.kv_lora_rank :]
