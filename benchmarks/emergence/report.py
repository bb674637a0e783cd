"""The emergence study's report: `run.py report`, under the name its command line has always had.

    python benchmarks/emergence/report.py --runs runs/emergence --out benchmarks/emergence
"""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "report", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("run.py")), run_name="__main__")
