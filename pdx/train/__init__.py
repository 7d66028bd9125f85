"""Training for the tiny models pdx ships: masked-diffusion LLMs (`diffusion`) and their synthetic
task suite (`tasks`); checkpoints go through `pdx.io.orbax_checkpoint`."""
