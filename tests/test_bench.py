"""The benchmark's quick mode: its figures agree with each other and with what it prints; the
training-input path is checked against the cache and per-file decoding; the GPU modes say
which math they use and divide by the matching peak."""

import json

import pytest
import torch

from medexgen_lib.bench import GPU_MODES, main, peak_tflops, tf32


@pytest.mark.slow  # runs the benchmark (about 12 s): with -m slow
def test_quick_benchmark_reports_consistent_figures(tmp_path, capsys):
    assert main(["--quick", "-p", "paths.output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "logs" / "bench" / "quick.json").read_text())
    printed = capsys.readouterr().out
    for name in ("512", "2048", "shared_real"):
        r = report["images"][name]
        assert r["identical_outputs"] is True  # loader == cache rows == per-file decode, same images
        assert r["speedup"] == pytest.approx(r["cached_images_per_s"] / r["naive_images_per_s"])
        assert r["training_augmented_speedup"] == pytest.approx(
            r["training_augmented_images_per_s"] / r["naive_images_per_s"])
        assert f"{r['naive_images_per_s']:>9.0f}" in printed
    assert report["image_cache_speedup_512"] == report["images"]["512"]["speedup"]
    assert report["generation"]["identical_outputs"] is True
    assert report["generation_kv_speedup"] == report["generation"]["speedup"]
    augmentation = report["augmentation_cpu"]
    assert augmentation["speedup"] == pytest.approx(
        augmentation["torchvision_per_view_ms"] / augmentation["augment_views_ms"])
    assert f"augment_views {augmentation['augment_views_ms']:.2f} ms" in printed
    assert report["machine"]["cores"] >= 1


def test_gpu_modes_name_their_math_and_use_the_matching_peak():
    assert peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16 + channels_last") == 312.0
    assert peak_tflops("cpu", "fp32") is None
    assert "TF32 off" in GPU_MODES["fp32"]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_accelerated_training_code_path_runs_on_cpu():
    # On a GPU this compares the four modes at full size; here tiny shapes check that each runs
    # under its own label, that FLOPs are counted and that no MFU is claimed without a known peak.
    from medexgen_lib.bench import bench_accelerated_training

    result = bench_accelerated_training(quick=True)
    for mode, math in GPU_MODES.items():
        assert result[mode]["math"] == math and result[mode]["samples_per_s"] > 0
        assert result[mode]["flops_per_step"] > 1e8 and result[mode]["mfu"] is None  # no peak for a CPU
    assert result["tf32_speedup_over_fp32"] == pytest.approx(
        result["tf32"]["samples_per_s"] / result["fp32"]["samples_per_s"])


@pytest.mark.reliability
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, capsys):
    """``python -m medexgen_lib.bench -p bogus.key 1`` ended in a ConfigError traceback."""
    import subprocess
    import sys

    assert main(["-p", "bogus.key", "1", "-p", "paths.output_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown config key 'bogus.key': config has no field 'bogus' (known: data, eval, guidance, "
        "images, model, paths, profile, seed, split, text, tokenizer, train)"]
    run = subprocess.run([sys.executable, "-m", "medexgen_lib.bench", "-p", "bogus.key", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1 and "bogus.key" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # runs the benchmark (about 12 s): with -m slow
def test_scale_benchmark_at_tiny_sizes_reports_every_figure_side_by_side(tmp_path, capsys):
    """``--name scale --sizes 40 80``: stages 01-03 in a child per size, the sharded cache, and
    the 0- and 2-worker loaders, which must deliver the same samples."""
    assert main(["--name", "scale", "--sizes", "80", "40", "-p", "paths.output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "logs" / "bench" / "scale.json").read_text())
    printed = capsys.readouterr().out
    scale = report["scale"]
    assert scale["sizes"] == [40, 80] and scale["image_size"] == 64
    step = scale["training_step"]
    assert step["batch"] == 8 and step["image_size"] == 64 and step["samples_per_s"] > 0  # the demo's
    for studies in (40, 80):
        r = scale["results"][str(studies)]
        assert r["studies"] == studies and studies <= r["images"] <= 2 * studies
        assert r["stages_s_per_1000"] == pytest.approx(sum(r["stage_s_per_1000"].values()))
        assert r["peak_rss_mb"] == max(r["stage_peak_rss_mb"].values()) > 100
        assert 0 < r["table_mb"] < 5 and f"{r['table_mb']:>12.1f}" in printed
        assert r["cache_shards"] == 1 and r["images"] * 64 * 64 / 2**20 <= r["cache_mb"] < 1
        # the MIMIC-layout data set as read: every image is a JPEG file (header alone ~600 bytes)
        assert r["data_mb"] > r["images"] * 300 / 2**20 and f"{r['data_mb']:>12.1f}" in printed
        loader = r["loader"]
        assert loader["same_samples"] is True and loader["samples"] > 8
        assert loader["samples_per_s"]["0"] > 0 and loader["samples_per_s"]["2"] > 0
        assert f"{loader['samples_per_s']['2']:>12.0f}" in printed
    small, large = scale["results"]["40"], scale["results"]["80"]
    goals = {g["goal"]: g for g in scale["goals"]}
    time_goal = goals["stages 01-03 seconds per study, 80 vs 40 studies"]
    assert time_goal["value"] == pytest.approx(large["stages_s_per_1000"] / small["stages_s_per_1000"])
    assert time_goal["pass"] == (time_goal["value"] <= 1.2)
    rss_goal = goals["peak RSS of stages 01-03, 80 vs 40 studies"]
    assert rss_goal["value"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"])
    loader_goal = goals["loader with 2 workers vs one demo training step, 80 studies"]
    assert loader_goal["pass"] == (large["loader"]["samples_per_s"]["2"] >= step["samples_per_s"])
    for goal in scale["goals"]:
        assert f"{'PASS' if goal['pass'] else 'FAIL'}  {goal['goal']}: {goal['value']:.2f}x" in printed
    assert f"{'studies':<34}{40:>12,}{80:>12,}" in printed


@pytest.mark.reliability
@pytest.mark.parametrize("sizes", [["40"], ["40", "40"], ["0", "40"]])
def test_scale_benchmark_refuses_sizes_it_cannot_compare_in_one_line(sizes, tmp_path, capsys):
    assert main(["--name", "scale", "--sizes", *sizes, "-p", "paths.output_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --sizes needs two or more different numbers of studies, each at least 1; got {' '.join(sizes)}"]
    assert not list(tmp_path.iterdir())
