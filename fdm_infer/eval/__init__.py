"""The paper's evaluation (§4): segmentation metrics and scoring, baselines, FID, and their commands."""
