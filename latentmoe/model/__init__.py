"""Pure-PyTorch DeepSeek-V2: config, MLA, RoPE, MoE, loader, tokenizer. No Ray, no serving."""

from latentmoe.model.config import ModelConfig, RopeConfig
from latentmoe.model.deepseek_v2 import DeepseekV2ForCausalLM
from latentmoe.model.loader import build_model, load_model, save_checkpoint

__all__ = ["ModelConfig", "RopeConfig", "DeepseekV2ForCausalLM", "build_model", "load_model", "save_checkpoint"]
