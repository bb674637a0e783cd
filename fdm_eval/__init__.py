"""How good and how fast a model is: the paper's evaluation (§4) of segmentation against labelled masks
(metrics, evaluate), the baselines it is compared with, FID, models scored on synthetic scenes
(scene_scores), the latency benchmark of the inference paths (bench, measure), and their commands (cli),
which `fdm-infer` offers as `evaluate`, `baseline`, `fid` and `bench`. It stands on fdm_core, fdm_infer and
fdm_export, never on training."""
