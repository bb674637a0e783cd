"""fdm training: model, diffusion, data, checkpoints and the `fdm-train` CLI."""
