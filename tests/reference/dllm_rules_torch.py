"""PyTorch transcriptions of the training-free dLLM commit rules, one row at one step, written from the
papers and their authors' code (loops and dicts, not the vectorised forms pdx uses). Each is a
`rule(row, logits [K, V] float64 with the mask token at -inf, masked [j...], step, decoded, **ahead) -> {j: token}`
for `llada_torch.decode(rule=...)`; greedy (argmax candidates).
"""

from __future__ import annotations

import torch


def _best(conf: dict[int, float]) -> int:
    """The most confident position (the lowest on ties)."""
    return min(conf, key=lambda j: (-conf[j], j))


def localleap(tau: float, tau_relaxed: float, radius: int):
    """LocalLeap's `get_transfer_index`: anchors are this step's masked positions with confidence >= tau;
    every other candidate is kept if >= tau, or >= tau' within `radius` of an anchor; the best always."""

    def rule(row, logits, masked, step, decoded, **_):
        probs = torch.softmax(logits, -1)
        x0 = {j: int(probs[j].argmax()) for j in masked}
        conf = {j: probs[j, x0[j]].item() for j in masked}
        anchors = [j for j in masked if conf[j] >= tau]
        near = {n for a in anchors for n in range(a - radius, a + radius + 1)}
        keep = {_best(conf)}
        for j in masked:
            if conf[j] >= (tau_relaxed if anchors and j in near else tau):
                keep.add(j)
        return {j: x0[j] for j in keep}

    return rule


def cad(tau: float, max_per_step: int, eos_ratio: float, eos_ids):
    """CD4LM's `generate_block`: EOS candidates wait until `eos_ratio` of the answer is decoded; the k
    best of the rest commit, k = clip(#conf >= tau, 1, max_per_step); all held back: the leftmost."""

    def rule(row, logits, masked, step, decoded, **_):
        probs = torch.softmax(logits, -1)
        x0 = {j: int(probs[j].argmax()) for j in masked}
        valid = [j for j in masked if not (decoded < eos_ratio and x0[j] in eos_ids)]
        if not valid:
            return {masked[0]: x0[masked[0]]}
        conf = {j: probs[j, x0[j]].item() for j in valid}
        k = min(max(sum(c >= tau for c in conf.values()), 1), max_per_step, len(valid))
        ranked = sorted(valid, key=lambda j: (-conf[j], j))
        return {j: x0[j] for j in ranked[:k]}

    return rule


def credit(tau: float, alpha: float, beta: float, gamma: float):
    """CreditDecoding as dInfer's `CreditThresholdParallelDecoder`: per row, a credit table per position
    and token, zeroed at a block's first step and decayed by beta after; each masked position's top-1 gains
    p^gamma; commits come from the fused logits l + alpha log(1 + C) at min(tau, best - 1e-5)."""
    tables: dict[int, torch.Tensor] = {}

    def rule(row, logits, masked, step, decoded, **_):
        if step == 0 or row not in tables:
            tables[row] = torch.zeros_like(logits)
        else:
            tables[row] *= beta
        c = tables[row]
        probs = torch.softmax(logits, -1)
        for j in masked:
            top = int(probs[j].argmax())
            c[j, top] += probs[j, top].item() ** gamma
        fused = torch.softmax(logits + alpha * torch.log1p(c), -1)
        x0 = {j: int(fused[j].argmax()) for j in masked}
        conf = {j: fused[j, x0[j]].item() for j in masked}
        bar = min(max(conf.values()) - 1e-5, tau)
        return {j: x0[j] for j in masked if conf[j] >= bar}

    return rule




def prophet(block_size: int, steps_per_block: int, total_steps: int, early: float, mid: float, late: float):
    """Prophet's `generate_earlyexit` over LLaDA's schedule: the mean top-1 minus top-2 logit gap over the
    answer slots still masked (pdx's answer window: see prophet.py) against the stage's threshold at
    progress (t + 1) / total_steps; past it, every such slot takes its argmax, else the schedule's top n."""

    def rule(row, logits, masked, step, decoded, *, ahead_logits, ahead, t):
        top2 = torch.topk(ahead_logits[ahead], 2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).mean().item()
        progress = (t + 1) / total_steps
        bar = early if progress < 0.33 else mid if progress < 0.67 else late
        if gap >= bar:
            return {j: int(ahead_logits[j].argmax()) for j in ahead}
        probs = torch.softmax(logits, -1)
        conf = {j: probs[j].max().item() for j in masked}
        n = block_size // steps_per_block + (step < block_size % steps_per_block)
        return {j: int(probs[j].argmax()) for j in sorted(masked, key=lambda j: (-conf[j], j))[:n]}

    return rule


@torch.no_grad()
def adablock_decode(model, prompts, *, prompt_width: int, gen_length: int, default_block: int, mask_id: int, eos_ids,
                    pad_id: int, tau: float, tau_delimiter: float, delimiters):
    """AdaBlock's `generate_adablock` (no cache), every row with its own blocks, all rows stepping together
    on pdx's left-padded canvas: at a row's block start, the most confident delimiter candidate among the
    next gen_length // 4 slots (the first on ties) ends the block if its confidence is >= tau_delimiter, else
    the block is default_block slots; inside, Fast-dLLM's threshold rule. Returns (generated part, commit
    steps, block ends [B, G] bool), as `llada_torch.decode`."""
    from tests.reference.llada_torch import _attention_mask, canvas

    b, p = len(prompts), prompt_width
    w, scan = p + gen_length, gen_length // 4
    x, valid = canvas(prompts, prompt_width, gen_length, mask_id, pad_id)
    attn, positions = _attention_mask(valid, "bidirectional", 1), torch.arange(w)[None].expand(b, w)
    commit_step = torch.full((b, gen_length), -1, dtype=torch.long)
    ends = torch.zeros((b, gen_length), dtype=torch.bool)
    start, end, fresh, done = [p] * b, [p] * b, [True] * b, [False] * b
    t = 0
    while any(not done[r] and start[r] < w for r in range(b)) and t < gen_length:
        logits = model(x, attention_mask=attn, position_ids=positions).logits.double()
        logits[..., mask_id] = float("-inf")
        probs = torch.softmax(logits, -1)
        for r in range(b):
            if done[r] or start[r] >= w:
                continue
            x0 = probs[r].argmax(-1)
            if fresh[r]:
                found = [j for j in range(start[r], min(start[r] + scan, w)) if int(x0[j]) in delimiters]
                conf = {j: probs[r, j, x0[j]].item() for j in found}
                best = min(found, key=lambda j: (-conf[j], j)) if found else None
                ok = best is not None and conf[best] >= tau_delimiter
                end[r] = best + 1 if ok else min(start[r] + default_block, w)
                ends[r, end[r] - 1 - p] = True
                fresh[r] = False
            idx = [j for j in range(start[r], end[r]) if x[r, j] == mask_id]
            conf = {j: probs[r, j, x0[j]].item() for j in idx}
            keep = {j for j in idx if conf[j] >= tau} | {min(idx, key=lambda j: (-conf[j], j))}
            for j in keep:
                x[r, j] = x0[j]
                commit_step[r, j - p] = t
            if all(x[r, j] != mask_id for j in range(start[r], end[r])):
                start[r], fresh[r] = end[r], True
            gen = x[r, p:].tolist()
            first_mask = gen.index(mask_id) if mask_id in gen else len(gen)
            done[r] = any(tok in eos_ids for tok in gen[:first_mask]) or first_mask == len(gen)
        t += 1
    return x[:, p:].numpy(), commit_step.numpy(), ends.numpy()
