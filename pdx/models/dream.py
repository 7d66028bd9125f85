"""Dream-7B: a Qwen2 transformer run bidirectionally as a masked-diffusion LLM.

Dream was initialised from an autoregressive model and kept its output shift: the logits at
position i predict the token at i + 1. The dLLM decoders read `DLLM_LOGIT_SHIFT` from the model's
family module and take each slot's logits from the position before it.
"""

from pdx.models.transformer import (
    Config,
    KVCache,
    forward,
    hidden_states,
    init_cache,
    init_params,
    lm_head,
    stack_layers,
    unstack_layers,
)

DLLM_LOGIT_SHIFT = 1

__all__ = ["Config", "KVCache", "forward", "hidden_states", "init_cache", "init_params", "lm_head", "stack_layers",
           "unstack_layers", "DLLM_LOGIT_SHIFT"]
