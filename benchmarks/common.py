"""What the benchmark scripts share: the machine they ran on, timing, and models with random weights
(defined in fdm_infer.measure, which `fdm-infer bench` uses too)."""
from fdm_infer.measure import cpu_name, environment, median_ms, random_model

__all__ = ["cpu_name", "environment", "median_ms", "random_model"]
