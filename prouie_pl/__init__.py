"""ProUIE-PL: one LLM for universal information extraction, trained in three progressive stages.

Complete Modeling (curriculum SFT, full format) -> Streamlined Alignment (sampled SFT, concise format) ->
Deep Exploration (GRPO with stepwise fine-grained rewards), on Lightning, with Triton kernels and a
single-GPU 4-bit QLoRA path.
"""

__version__ = "0.1.0"

__all__ = ["Extractor", "__version__"]


def __getattr__(name: str):
    # imported on first use: the extractor pulls in torch and transformers, which `import prouie_pl` should not
    if name == "Extractor":
        from .extractor import Extractor

        return Extractor
    raise AttributeError(f"module 'prouie_pl' has no attribute {name!r}")
