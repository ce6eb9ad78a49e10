"""DeepSeek-V2 and V3 in pure PyTorch, top to bottom: norm, MLA, MLP, gate, routed experts, MoE, block, model.

V3 (and R1, Kimi-K2, Moonlight) is V2's architecture with another router (``Gate``: sigmoid scores and
``noaux_tc``); one model class serves both.

Parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn.kv_b_proj.weight``),
except that routed experts are stacked per layer (``w13 [E, 2I, D]``, ``w2 [E, D, I]``); the loader
maps the Hub's one-tensor-per-expert names onto them.

The MoE layer can be split the way the cluster splits it: ``gate`` (route tokens), then
``experts`` (run a given set of experts on given tokens, partial sums), then combine with the
shared experts. ``DeepseekV2ForCausalLM.forward`` takes an optional ``routed_fn`` so the routed
part can run elsewhere. ``DecoderLayer.forward`` is the one block; it takes the attention
itself as a callable (``AttendFn``): the whole model attends over the sequence in hand, the
engine's model runner over its paged latent cache.

Legend: B batch, T query tokens, S key tokens, D hidden, H heads, R kv_lora_rank,
P qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.kernels.reference import fused_moe_ref, mla_decode_ref
from latentmoe.model.config import ModelConfig
from latentmoe.model.rope import RotaryEmbedding, apply_rope

# routed_fn(layer_idx, h [T, D], topk_ids [T, K], topk_weights [T, K]) -> weighted sum of routed experts [T, D],
# or a callable that returns it: an exchange in flight (the cluster's dispatch), finished after the shared experts
RoutedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor],
                    "torch.Tensor | Callable[[], torch.Tensor]"]
# attend_fn(attn, q_nope [.., T, H, N], q_pe [.., T, H, P], c_kv [.., T, R], k_pe [.., T, P]) -> output [.., T, D]:
# the attention of layer ``attn.layer_idx`` for these tokens (keys: these tokens' latents and any cached ones)
AttendFn = Callable[["MLA", torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` without a bias whose product a kernel can take over: ``impl(x)`` when set (``kernels.set_kernels``
    puts the CPU's prepacked oneDNN product there), else ``F.linear``. Same parameters and checkpoint names."""

    impl: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.impl is None else self.impl(x)


class MLA(nn.Module):
    """Multi-head latent attention. Only ``[c_kv | k_pe]`` (R + P values per token) needs caching."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.decode_impl = mla_decode_ref  # decode over the paged cache; kernels.set_kernels swaps in Triton
        self.num_heads, self.kv_lora_rank = c.num_attention_heads, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        qk_dim = c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, c.num_attention_heads * qk_dim)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = Linear(c.q_lora_rank, c.num_attention_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size)

    def project(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries and latents for tokens ``h [..., T, D]``; RoPE already applied.

        Returns ``q_nope [..., T, H, N]``, ``q_pe [..., T, H, P]``, ``c_kv [..., T, R]``, ``k_pe [..., T, P]``.
        """
        if hasattr(self, "q_proj"):
            q = self.q_proj(h)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        q = q.unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(h).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :])
        k_pe = apply_rope(k_pe, cos, sin)
        return q_nope, q_pe, c_kv, k_pe

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, N, R], [H, V, R]

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``q_nope W_UK``: [..., H, N] -> [..., H, R], so scores read ``c_kv`` directly."""
        w_uk, _ = self._w_uk_uv()
        return torch.einsum("...hn,hnr->...hr", q_nope, w_uk)

    def output_from_latent(self, o_latent: torch.Tensor) -> torch.Tensor:
        """``W_UV`` then ``o_proj``: [..., H, R] -> [..., D]."""
        _, w_uv = self._w_uk_uv()
        return self.o_proj(torch.einsum("...hr,hvr->...hv", o_latent.to(w_uv.dtype), w_uv).flatten(-2))

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Materialised K/V. ``q_* [T, H, *]``, ``c_kv [S, R]``, ``k_pe [S, P]``, ``mask [T, S]`` bool -> [T, D]."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))  # [S, H, N+V]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("thn,shn->hts", q_nope.float(), k_nope.float())
        scores = scores + torch.einsum("thp,sp->hts", q_pe.float(), k_pe.float())
        probs = torch.softmax((scores * self.softmax_scale).masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.einsum("hts,shv->thv", probs, v.float()).to(q_nope.dtype)  # [T, H, V]
        return self.o_proj(out.flatten(-2))

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention in latent space (what decode does over the cache); same signature as ``attend_naive``."""
        q_latent = self.absorb_query(q_nope).float()  # [T, H, R]
        scores = torch.einsum("thr,sr->hts", q_latent, c_kv.float())
        scores = scores + torch.einsum("thp,sp->hts", q_pe.float(), k_pe.float())
        probs = torch.softmax((scores * self.softmax_scale).masked_fill(~mask, float("-inf")), dim=-1)
        o_latent = torch.einsum("hts,sr->thr", probs, c_kv.float())  # [T, H, R]
        return self.output_from_latent(o_latent)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Chooses ``num_experts_per_tok`` routed experts per token, and their weights.

    DeepSeek-V2 (``softmax``): softmax over all experts, then greedy or group-limited top-k (groups ranked by
    their best score). DeepSeek-V3 (``sigmoid`` + ``noaux_tc``): sigmoid scores, ``e_score_correction_bias``
    added for choosing only (groups ranked by the sum of their two best biased scores), weights the unbiased
    scores. Either way the chosen experts lie in ``topk_group`` groups when there are groups.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.topk_method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        if self.topk_method == "noaux_tc":  # a checkpoint tensor (float32), learnt by the aux-loss-free balancing
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [T, D]`` -> ``topk_weights [T, K]`` (float32), ``topk_ids [T, K]`` (int64, global expert ids)."""
        logits = F.linear(h.float(), self.weight.float())  # [T, E]
        if self.topk_method == "noaux_tc":
            return self._noaux_tc(logits)
        scores = logits.softmax(dim=-1)  # [T, E]
        if self.topk_method == "group_limited_greedy":
            scores = self._keep_groups(scores, scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1), 0.0)
        topk_weights, topk_ids = scores.topk(self.top_k, dim=-1)
        # DeepSeek-V2's rule: renormalise (and then no scaling factor), or scale.
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weights = topk_weights * self.routed_scaling_factor
        return topk_weights, topk_ids

    def _noaux_tc(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3's routing on ``logits [T, E]``."""
        scores = logits.sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # [T, E] biased: for choosing only
        if self.n_group > 1:
            two_best = choice.unflatten(-1, (self.n_group, -1)).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            choice = self._keep_groups(choice, two_best, float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1).indices  # [T, K]
        topk_weights = scores.gather(1, topk_ids)  # the unbiased scores
        # DeepSeek-V3's rule: renormalise when asked, then always scale.
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.routed_scaling_factor, topk_ids

    def _keep_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """``scores [T, E]`` with every group outside the ``topk_group`` best (by ``group_scores [T, G]``) set to
        ``fill``."""
        group_ids = group_scores.topk(self.topk_group, dim=-1).indices  # [T, M]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)  # [T, G]
        grouped = scores.unflatten(-1, (self.n_group, -1))  # [T, G, E/G]
        return grouped.masked_fill(~keep[..., None], fill).flatten(-2)


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer that this process holds (all of them, or a subset)."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None):
        super().__init__()
        n = config.n_routed_experts
        self.expert_ids = list(range(n)) if expert_ids is None else sorted(expert_ids)
        assert all(0 <= e < n for e in self.expert_ids), f"expert ids {self.expert_ids} outside [0, {n})"
        D, inter, E = config.hidden_size, config.moe_intermediate_size, len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, D))  # gate_proj rows, then up_proj rows
        self.w2 = nn.Parameter(torch.empty(E, D, inter))  # down_proj
        local = torch.full((n,), -1, dtype=torch.long)
        local[self.expert_ids] = torch.arange(E)
        self.register_buffer("local_index", local, persistent=False)  # global id -> slot, -1 if not here
        self.moe_impl = fused_moe_ref  # kernels.set_kernels swaps in the Triton kernel on GPUs

    def forward(self, h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Partial sum over the held experts: ``h [T, D]``, global ``topk_ids [T, K]`` -> [T, D]."""
        if not self.expert_ids:
            return torch.zeros_like(h)
        return self.moe_impl(h, self.w13, self.w2, self.local_index[topk_ids], topk_weights)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None):
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config, expert_ids)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )

    def forward(self, h: torch.Tensor, routed_fn: Callable | None = None) -> torch.Tensor:
        """``h [T, D]`` (normed); ``routed_fn(h, ids, weights)`` replaces the local routed experts. When it
        returns a callable (the routed experts at work elsewhere), the shared experts run before it is called."""
        topk_weights, topk_ids = self.gate(h)
        routed = (routed_fn or self.experts)(h, topk_ids, topk_weights)
        shared = self.shared_experts(h) if self.shared_experts is not None else None
        if callable(routed):
            routed = routed()
        if shared is not None:
            routed = routed + shared
        return routed.to(h.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, expert_ids: Sequence[int] | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, expert_ids) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend_fn: AttendFn,
                routed_fn: RoutedFn | None = None) -> torch.Tensor:
        """The block on ``x [..., T, D]`` (``cos``/``sin`` of its positions): attention, then the feed-forward."""
        q_nope, q_pe, c_kv, k_pe = self.self_attn.project(self.input_layernorm(x), cos, sin)
        x = x + attend_fn(self.self_attn, q_nope, q_pe, c_kv, k_pe)
        return self.ffn(x.flatten(0, -2), routed_fn).view_as(x)

    def ffn(self, x: torch.Tensor, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        """Residual feed-forward on ``x [T, D]``."""
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h)
        fn = None if routed_fn is None else (lambda h_, ids, w: routed_fn(self.layer_idx, h_, ids, w))
        return x + self.mlp(h, fn)


class DeepseekV2Model(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, expert_ids) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV2ForCausalLM(nn.Module):
    """The whole model. ``forward(input_ids [B, T]) -> logits [B, T, vocab]`` (causal, positions 0..T-1, no cache)."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, expert_ids)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim)
        self.absorbed = False  # plain forward uses naive MLA unless set

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary(positions)  # [T, P/2]
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()

        def attend_fn(attn: MLA, q_nope, q_pe, c_kv, k_pe):  # [B, T, ...] -> [B, T, D], over the T tokens
            attend = attn.attend_absorbed if self.absorbed else attn.attend_naive
            return torch.stack([attend(q_nope[b], q_pe[b], c_kv[b], k_pe[b], mask) for b in range(B)])

        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        for layer in self.model.layers:
            x = layer(x, cos, sin, attend_fn, routed_fn)
        return self.lm_head(self.model.norm(x)).float()
