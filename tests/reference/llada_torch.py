"""PyTorch reference for masked-diffusion decoding, written from the papers, for parity tests.

LLaDA (Nie et al. 2025, Alg. "semi-autoregressive low-confidence remasking"): the answer is split
into blocks decoded left to right; each block gets a fixed number of steps and at step i commits
the n_i most confident masked tokens (n_i: the block's masked count spread evenly over the steps,
the remainder on the first steps). Fast-dLLM (Wu et al. 2025): at each step commit every masked
token of the block with confidence >= tau (at least the most confident one), or, with the factor
rule, the n best where the i-th best has confidence >= 1 - f / (i + 1).

Runs a transformers causal LM (e.g. `LlamaForCausalLM`) in bidirectional or block-causal mode by
passing an explicit 4D boolean attention mask, on the same left-padded canvas pdx uses (positions
are column indices). No KV cache, no sampling: full forward every step, argmax candidates,
softmax-probability confidences (float64). Rows stop once an EOS is committed with every slot before
it decoded. Returns the canvas' generated part and the step at which each slot was committed.
"""

from __future__ import annotations

import torch


def _attention_mask(valid: torch.Tensor, attention: str, block_size: int) -> torch.Tensor:
    """[B, 1, W, W] bool: query row sees key column. Padding queries see themselves (their output is unused)."""
    w = valid.shape[1]
    q, k = torch.arange(w)[:, None], torch.arange(w)[None, :]
    allowed = (k // block_size) <= (q // block_size)
    if attention == "bidirectional":
        allowed = torch.ones(w, w, dtype=torch.bool)
    mask = allowed[None] & valid[:, None, :]
    mask |= torch.eye(w, dtype=torch.bool)[None] & ~valid[:, :, None]
    return mask[:, None]


def canvas(prompts, prompt_width: int, gen_length: int, mask_id: int, pad_id: int):
    """pdx's canvas: `[left padding | prompt | gen_length masks]` tokens and valid columns, `[B, W]` each."""
    p, w = prompt_width, prompt_width + gen_length
    x = torch.full((len(prompts), w), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), w, dtype=torch.bool)
    for i, q in enumerate(prompts):
        x[i, p - len(q) : p] = torch.tensor(q)
        valid[i, p - len(q) :] = True
    x[:, p:] = mask_id
    return x, valid


def _count(conf: list[float], masked: int, step: int, mode: str, steps: int, block_size: int, knob: float) -> int:
    """How many of the sorted (descending) masked confidences to commit this step."""
    if mode == "schedule":
        return block_size // steps + (step < block_size % steps)
    if mode == "threshold":
        return max(1, sum(c >= knob for c in conf))
    n = 0  # factor rule
    while n < masked and conf[n] >= 1 - knob / (n + 2):
        n += 1
    return max(1, n)


@torch.no_grad()
def decode(model, prompts, *, prompt_width: int, gen_length: int, block_size: int, mask_id: int, eos_ids, pad_id: int,
           mode: str = "", steps: int = 0, knob: float = 0.0, attention: str = "bidirectional", cfg_scale: float = 0.0,
           logit_shift: int = 0, rule=None):
    """mode: "schedule" (LLaDA, `steps` per block), "threshold" (knob = tau) or "factor" (knob = f).
    cfg_scale > 0: classifier-free guidance against the canvas with the prompt masked out.
    logit_shift = 1: slot i is predicted by the logits at i - 1 (Dream).
    rule: instead of a mode, `rule(row, logits [K, V] float64, masked [j...], step, decoded, *, ahead_logits,
    ahead, t) -> {j: token}`, the commits of one row at one step (tests/reference/dllm_rules_torch.py): decoded
    is the share of the row's generated slots decoded before the step, ahead_logits [W - lo, V] the logits from
    the block start to the end, ahead its masked slots, t the step of the whole decode; j may pass the block."""
    b, p = len(prompts), prompt_width
    w = p + gen_length
    x, valid = canvas(prompts, prompt_width, gen_length, mask_id, pad_id)
    attn = _attention_mask(valid, attention, block_size)
    positions = torch.arange(w)[None].expand(b, w)
    commit_step = torch.full((b, gen_length), -1, dtype=torch.long)
    done = [False] * b
    t = 0
    for blk in range(gen_length // block_size):
        lo, hi = p + blk * block_size, p + (blk + 1) * block_size
        step = 0
        while any(not done[r] and (x[r, lo:hi] == mask_id).any() for r in range(b)):
            window = slice(lo - logit_shift, w - logit_shift)  # the block and every slot after it
            logits = model(x, attention_mask=attn, position_ids=positions).logits[:, window].double()
            if cfg_scale > 0:
                uncond = torch.where(valid & (torch.arange(w) < p), mask_id, x)
                un = model(uncond, attention_mask=attn, position_ids=positions).logits[:, window].double()
                logits = un + (cfg_scale + 1) * (logits - un)
            logits[..., mask_id] = float("-inf")
            ahead_logits, logits = logits, logits[:, :block_size]
            probs = torch.softmax(logits, -1)
            x0 = probs.argmax(-1)
            for r in range(b):
                idx = [j for j in range(block_size) if x[r, lo + j] == mask_id] if not done[r] else []
                if not idx:
                    continue
                if rule is not None:
                    decoded = (x[r, p:] != mask_id).double().mean().item()
                    ahead = [j for j in range(w - lo) if x[r, lo + j] == mask_id]
                    commits = rule(r, logits[r], idx, step, decoded, ahead_logits=ahead_logits[r], ahead=ahead, t=t)
                else:
                    conf = {j: probs[r, j, x0[r, j]].item() for j in idx}
                    ranked = sorted(idx, key=lambda j: (-conf[j], j))
                    n = _count([conf[j] for j in ranked], len(idx), step, mode, steps, block_size, knob)
                    commits = {j: x0[r, j].item() for j in ranked[:n]}
                for j, token in commits.items():
                    x[r, lo + j] = token
                    commit_step[r, lo + j - p] = t
                for tok in x[r, p:].tolist():
                    if tok == mask_id:
                        break
                    if tok in eos_ids:
                        done[r] = True
                        break
            step += 1
            t += 1
    return x[:, p:].numpy(), commit_step.numpy()
