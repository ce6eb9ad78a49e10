"""latentmoe: serving DeepSeek-V2-family MoE models (MLA + DeepSeekMoE) on Ray."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):  # lazy: `import latentmoe.model` must not pull in the engine
    if name == "LLM":
        from latentmoe.llm import LLM

        return LLM
    if name == "SamplingParams":
        from latentmoe.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
