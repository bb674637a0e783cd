import json
import math

import pytest
import torch
from click.testing import CliRunner

from fdm_core.model import count_flops
from fdm_eval.bench import VARIANTS
from fdm_infer.cli import main_group


def test_bench_smoke_checks_every_variant_that_runs(tmp_path):
    result = CliRunner().invoke(main_group, ["bench", "--smoke", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "bench.json").read_text())
    rows = bench["rows"]
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["model"], r["variant"]) for r in ran} >= {
        ("factorized", "naive fp32 (K decoder calls)"), ("factorized", "fused fp32"), ("plain U-Net", "fused fp32")}
    for r in ran:
        # each variant was compared with the fp32 reference before it was timed
        assert math.isfinite(r["err_eps"]) and math.isfinite(r["err_masks"]), r
        assert r["err_eps"] < 1e-3 and r["err_masks"] < 1e-3, r
        assert r["images_per_s"] > 0 and r["tflops"] > 0
    if not torch.cuda.is_available():
        cuda_only = {v.label for v in VARIANTS if v.needs_cuda}
        skipped = {r["variant"] for r in rows if r["status"] == "skipped: needs CUDA"}
        assert skipped == cuda_only
    assert not [r for r in rows if r["status"].startswith("failed")]
    assert {r["batch"] for r in rows} == {1, 2}
    assert [(s["steps"], s["status"]) for s in bench["sampling"]][-1] == (5, "ok")
    assert "total_s" in bench["sampling"][-1]
    # the table is printed last, the same as the Markdown file, without NaN anywhere
    table = (tmp_path / "bench.md").read_text()
    assert result.stdout.endswith(table)
    assert "nan" not in table.lower()
    assert "| tiny-32 | plain U-Net | fused fp32 | 2 |" in table
    # The engines side by side first: images/s and parity against the fp32 torch reference, per batch.
    side = table.split("All measurements:")[0]
    assert "| preset | engine | variant | batch | images/s | parity (max abs diff vs fp32 torch) | status |" in side
    for r in ran:
        if r["model"] == "factorized":
            assert r["parity"] == max(r["err_eps"], r["err_masks"])
            assert (f"| tiny-32 | {r['engine']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | "
                    f"{r['parity']:.1e} | ok |") in side
    trt = [r for r in rows if r["engine"] == "trt"]
    assert [r["batch"] for r in trt] == [1, 2] and all(r["status"].startswith("skipped: ") for r in trt)


def test_the_inference_paths_the_command_offers_are_the_variants_it_measures():
    option = next(p for p in main_group.commands["bench"].params if p.name == "variant_keys")
    assert list(option.type.choices) == [v.key for v in VARIANTS]


def test_the_cpu_paths_the_command_offers_are_the_paths_it_measures():
    from fdm_eval.cpu_paths import PATH_KEYS

    option = next(p for p in main_group.commands["bench"].params if p.name == "cpu_path_keys")
    assert list(option.type.choices) == PATH_KEYS


def test_threads_benchmark_measures_in_a_process_with_the_threads_asked():
    from benchmarks.threads import run as threads

    # A fresh process with OMP_NUM_THREADS, torch.set_num_threads at 2 and the wait policy asked (run_worker
    # refuses a process that reports anything else).
    assert threads.run_worker("sample", 2, "PASSIVE", threads.QUICK) > 0
    configs = threads.configurations([1, 2], ["default", "PASSIVE"])
    assert configs == [(1, "default"), (2, "default"), (2, "PASSIVE")]
    rows = [{"task": "train", "condition": "idle", "threads": 1, "wait_policy": "default", "value": 20.0},
            {"task": "train", "condition": "contended", "threads": 1, "wait_policy": "default", "value": 4.0},
            {"task": "sample", "condition": "idle", "threads": 1, "wait_policy": "default", "value": 0.1},
            {"task": "sample", "condition": "contended", "threads": 1, "wait_policy": "default", "value": 1.5}]
    env = {"cpu": "x", "cores": 2, "torch": "t", "python": "p", "load_before": 0.0}
    table = threads.markdown({"quick": False, "settings": threads.FULL, "threads": [1], "environment": env,
                              "configurations": [(1, "default")], "rows": rows})
    assert "| train | 1 | default | 20.00 images/s | 4.00 images/s | 5.0x slower |" in table
    assert "| sample | 1 | default | 0.100 s | 1.500 s | 15.0x slower |" in table


def test_sampling_step_is_fused_unless_dynamic_thresholding_needs_the_quantile():
    from types import SimpleNamespace

    from fdm_core.config import preset
    from fdm_core.diffusion import GaussianDiffusion
    from fdm_eval.bench import sampler_step

    cfg = preset("tiny-32")
    calls = {"denoise": 0, "step": 0}

    def denoise(x, t, y):
        calls["denoise"] += 1
        return torch.zeros_like(x), torch.ones(x.shape[0], 2, *x.shape[2:])

    def ddpm_step(x, t, y, coef, z):
        calls["step"] += 1
        return x, torch.ones(x.shape[0], 2, *x.shape[2:])

    engine = SimpleNamespace(denoise=denoise, ddpm_step=ddpm_step)
    expected = {"static": {"denoise": 0, "step": 1}, "none": {"denoise": 0, "step": 1},
                "dynamic": {"denoise": 1, "step": 0}}
    for clip, counts in expected.items():
        calls.update(denoise=0, step=0)
        sampler_step(engine, GaussianDiffusion(), 2, cfg, torch.device("cpu"), clip)()
        assert calls == counts, clip


def test_the_cpu_report_checks_each_path_against_torch_eager_and_segments_end_to_end(tmp_path):
    from helpers import make_checkpoint, write_images

    model = tmp_path / "tiny.safetensors"
    make_checkpoint(model, image_size=16)
    folder = tmp_path / "faces"
    write_images(folder, 6)
    result = CliRunner().invoke(main_group, ["bench", "--cpu", "--smoke", "--model", str(model), "--cpu-path", "onnx",
                                             "--cpu-path", "int8", "--image-folder", str(folder), "--limit", "5",
                                             "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["machine"]["matmul_gflops"] > 0 and report["machine"]["conv_gflops"] > 0
    int8 = report["segmentation"].pop()  # quantized: measured with its agreement, whatever it is
    assert int8["path"] == "int8" and int8["status"] == "ok" and 0 < int8["label_agreement"] <= 1
    for table in ("segmentation", "sampling"):
        rows = {r["path"]: r for r in report[table]}
        assert list(rows) == ["eager", "onnx"] and all(r["status"] == "ok" for r in rows.values()), rows
        assert rows["eager"]["vs_eager"] == 1 and rows["eager"]["label_agreement"] == 1
        assert rows["onnx"]["label_agreement"] > 0.99 and rows["onnx"]["max_abs_diff"] < 1e-4
        assert rows["onnx"]["gflops"] == pytest.approx(rows["onnx"]["images_per_s"] * (
            count_flops(report_config(model), masks_only=table == "segmentation") / 1e9))
    runs = report["end_to_end"]
    assert [(r["images"], r["status"]) for r in runs] == [(5, "ok"), (5, "ok")]
    assert runs[0]["workers"] == 0 and runs[1]["workers"] > 0 and runs[1]["engine"] == "onnx"
    assert runs[1]["label_agreement"] > 0.99
    table = (tmp_path / "out" / "bench.md").read_text()
    assert result.stdout.endswith(table) and "| matmul 1024 x 1024 |" in table and "nan" not in table.lower()


def report_config(path):
    from fdm_core.checkpoint import read_checkpoint

    return read_checkpoint(path)[0]
