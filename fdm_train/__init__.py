"""fdm training: the loop, the training data pipeline, run folders and the `fdm-train` CLI."""
