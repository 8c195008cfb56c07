"""ProUIE-PL: one LLM for universal information extraction, trained in three progressive stages.

Complete Modeling (curriculum SFT, full format) -> Streamlined Alignment (sampled SFT, concise format) ->
Deep Exploration (GRPO with stepwise fine-grained rewards), on Lightning, with Triton kernels and a
single-GPU 4-bit QLoRA path.
"""

__version__ = "0.1.0"
