"""The options of the evaluation and benchmark commands (`fdm-infer evaluate`, `baseline`, `fid`, `bench`),
each declared once as a `Setting` (fdm_core.settings) in a module that loads nothing beyond the standard
library: the commands make their click options from them and the library takes its defaults from them."""
from __future__ import annotations

from fdm_core.settings import BATCH_SIZE, DEVICE, FILE, PLAIN_SEED, STEPS, Setting

# ----- evaluate (fdm_eval.evaluate) -----

PROTOCOL = Setting(("--protocol",), "all", choices=("foreground", "parts", "all"), show_default=True,
                   help="foreground: Acc/IoU/DICE of the non-zero labels; parts: pixel Acc/mIoU after Hungarian "
                        "matching over the set; all: both.")
SIZE_MODE = Setting(("--size-mode",), "upsample", choices=("upsample", "downsample"), show_default=True,
                    help="upsample: predictions to the masks' resolution (soft masks bilinear, label maps nearest); "
                         "downsample: masks to the predictions' resolution (nearest).")
RESULTS = Setting(("-o", "--out"), "results.json", name="out", type=FILE,
                  help="Output file: the JSON results; the Markdown table goes beside it (.md).")

# ----- baseline (fdm_eval.baselines) -----

MARGIN = Setting(("--margin",), 0.1, type=float, low=0, high=0.5, high_open=True, show_default=True,
                 help="grabcut: the initial rectangle leaves this fraction of width/height on each side.")
GRABCUT_ROUNDS = Setting(("--grabcut-rounds",), 5, name="iterations", type=int, low=1, show_default=True,
                         help="grabcut: rounds of GrabCut's estimation.")
CLUSTERS = Setting(("--clusters",), 3, name="k", type=int, low=2, show_default=True, help="kmeans-ddpm: K-means clusters.")
PIXELS_PER_IMAGE = Setting(("--pixels-per-image",), 64, type=int, low=1, show_default=True,
                           help="kmeans-ddpm: random pixels per image in the K-means fit.")
KMEANS_BATCH_SIZE = BATCH_SIZE.but(show_default=True, help="kmeans-ddpm: images per forward pass.")
KMEANS_DEVICE = DEVICE.but(show_default=True, help=f"kmeans-ddpm: {DEVICE.help}")
BASELINE_SEED = PLAIN_SEED.but(show_default=True,
                               help="Seed of grabcut's color models / of kmeans-ddpm's noise, pixel sample and K-means.")

# ----- fid (fdm_eval.fid) -----

REFERENCE_SIZE = Setting(("--reference-size",), "auto", show_default=True,
                         help="Bring reference images to SxS as training does (shorter side, center crop) before the "
                              "299 resize: 'auto' = the generated images' size, an integer, or 'none'.")
FID_BATCH_SIZE = BATCH_SIZE.but(default=50, show_default=True, help="Images per Inception forward pass.")
FID_DEVICE = DEVICE.but(show_default=True)
FID_SEED = PLAIN_SEED.but(show_default=True, help="Seed of the reference subset.")

# ----- bench (fdm_eval.bench, fdm_eval.cpu_paths) -----

BENCH_REPEATS = Setting(("--repeats",), 30, type=int, low=3, help="Timed calls at most.")
BENCH_BUDGET = Setting(("--budget",), 10.0, name="budget_s", type=float, low=0, low_open=True,
                       help="Seconds of timed calls per measurement at most (at least 3 calls).")
BENCH_SAMPLE_STEPS = STEPS.but(flags=("--sample-steps",),
                               help="Steps of the whole DDPM run [default: 1000 on a GPU, 50 on a CPU].")
BENCH_LIMIT = Setting(("--limit",), 1600, type=int, low=1, show_default=True,
                      help="With --cpu --image-folder: the images segmented end to end.")
