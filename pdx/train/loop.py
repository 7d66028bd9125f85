"""A resumable training loop: tqdm progress, an atomic orbax checkpoint of the whole training state
every `save_every` steps, and resume from it after a kill with the same loss curve as a run that was
never stopped.

The state is the params, the optimizer state, the step, the losses so far and the batch sampler's
numpy generator; the step's PRNG key is `fold_in(seed key, step)`. Restored exactly, the resumed run
draws the same batches and keys and so computes the same losses (XLA on CPU is deterministic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np

from pdx.errors import InvalidInputError
from pdx.files import atomic_dir, atomic_write, recover_dir

STATE, PROGRESS = "state", "progress.json"


def _save(directory: str, params, opt_state, step: int, losses: list[float], rng: np.random.Generator,
          meta: dict, elapsed_s: float) -> None:
    import orbax.checkpoint as ocp

    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves((params, opt_state)))}

    def write(tmp: str) -> None:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, STATE), leaves)
            ckpt.wait_until_finished()
        with open(os.path.join(tmp, PROGRESS), "w") as f:
            json.dump({"step": step, "losses": losses, "rng": rng.bit_generator.state, "elapsed_s": round(elapsed_s, 1),
                       **meta}, f)

    atomic_dir(directory, write)


def _restore(directory: str, params, opt_state, rng: np.random.Generator):
    """(params, opt_state, step, losses, elapsed_s) from `directory`, shaped like the given fresh state; sets `rng`."""
    import orbax.checkpoint as ocp

    progress = read_progress(directory)
    treedef = jax.tree.structure((params, opt_state))
    with ocp.StandardCheckpointer() as ckpt:
        leaves = ckpt.restore(os.path.join(os.path.abspath(directory), STATE))
    fresh = jax.tree.leaves((params, opt_state))
    if len(leaves) != len(fresh) or any(leaves[str(i)].shape != x.shape for i, x in enumerate(fresh)):
        raise InvalidInputError(f"{directory} holds the training state of a different model or optimizer")
    params, opt_state = jax.tree.unflatten(treedef, [jax.numpy.asarray(leaves[str(i)]) for i in range(len(fresh))])
    rng.bit_generator.state = progress["rng"]
    return params, opt_state, progress["step"], progress["losses"], progress.get("elapsed_s", 0.0)


def record_run(path: str, name: str, train_s: float, steps: int, final_loss: float) -> None:
    """Add (or replace) run `name`'s wall time, steps and final loss in the JSON record at `path`."""
    record = {}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    record[name] = dict(train_s=train_s, steps=steps, final_loss=final_loss)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, json.dumps(record, indent=1))


def read_progress(directory: str) -> dict | None:
    """The saved progress of the run in `directory` (step, losses, elapsed_s: wall seconds over all its
    pieces, and the caller's meta), or None when it holds none."""
    path = os.path.join(directory, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def optimizer(tc):
    """AdamW with global-norm clipping at 1 and a warmup-cosine schedule to 5% of `tc.lr` over `tc.steps`
    (`tc`: any config with steps, lr, warmup and weight_decay)."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, min(tc.warmup, tc.steps // 2), tc.steps, tc.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=tc.weight_decay))


def fit(params, optimizer, step_fn: Callable, batch_fn: Callable, *, steps: int, seed: int,
        checkpoint_dir: str | None = None, save_every: int = 100, progress: bool = True, desc: str = "train",
        meta: dict | None = None, time_limit_s: float | None = None):
    """Run `steps` optimizer steps; returns (params, losses [steps] as numpy).

    step_fn(params, opt_state, batch, key, step) -> (params, opt_state, loss): one jitted update.
    batch_fn(rng, step) -> batch: the step's data, drawn from the numpy generator `rng`.
    checkpoint_dir: where the training state lives; a run finding one there resumes from it, unless it
    was saved with another `meta` (a different recipe: an `InvalidInputError`, not a silent mix).
    time_limit_s: stop after this many seconds (saving the state first): a long schedule runs in pieces,
    and the losses returned are then fewer than `steps` (the run is not finished)."""
    import time

    from tqdm import tqdm

    if steps < 1:
        raise InvalidInputError(f"steps must be positive, got {steps}")
    if save_every < 1:
        raise InvalidInputError(f"save_every must be positive, got {save_every}")
    if time_limit_s is not None and (time_limit_s <= 0 or not checkpoint_dir):
        raise InvalidInputError(f"a time limit ({time_limit_s}) must be positive and needs a checkpoint_dir "
                                "to resume from")
    t0 = time.monotonic()
    key = jax.random.PRNGKey(seed)
    rng = np.random.default_rng(seed)
    opt_state = optimizer.init(params)
    start, losses, before = 0, [], 0.0
    if checkpoint_dir:
        recover_dir(checkpoint_dir)  # what a run killed while saving left: a half-written or swapped-out state
        saved = read_progress(checkpoint_dir)
        if saved is not None:
            if changed := sorted(k for k, v in (meta or {}).items() if saved.get(k) != json.loads(json.dumps(v))):
                raise InvalidInputError(f"{checkpoint_dir} holds a run with other {', '.join(changed)} settings: "
                                        "remove it to start over, or pick another directory")
            params, opt_state, start, losses, before = _restore(checkpoint_dir, params, opt_state, rng)
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc=desc)
    for step in bar:
        params, opt_state, loss = step_fn(params, opt_state, batch_fn(rng, step), jax.random.fold_in(key, step),
                                          step)
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        out_of_time = time_limit_s is not None and time.monotonic() - t0 > time_limit_s
        if checkpoint_dir and ((step + 1) % save_every == 0 or step + 1 == steps or out_of_time):
            _save(checkpoint_dir, params, opt_state, step + 1, losses, rng, meta or {}, before + time.monotonic() - t0)
        if out_of_time:
            break
    return params, np.array(losses[:steps])
