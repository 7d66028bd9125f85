"""Masked-diffusion LLM decoding: LLaDA (fixed steps, low-confidence / random remasking) and Fast-dLLM
(confidence-threshold and factor parallel decoding, prefix and dual KV caches).

All strategies share one jitted `lax.while_loop` (`core.decode`); they differ in the static `Spec`
and in the commit policy (`policies.py`), the plug-in point for later strategies.
"""
