"""`fdm-infer`: segment real images, generate samples, interpolate, with any registered engine."""
from __future__ import annotations

import click

from fdm_train.errors import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_group():
    """Segment images, generate samples and interpolate with a factorized diffusion model."""


def main():
    run_cli(main_group, "fdm-infer")
