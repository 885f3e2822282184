"""The benchmark's quick mode: its figures agree with each other and with what it prints; the
training-input path is checked against the cache and per-file decoding; the GPU modes say
which math they use and divide by the matching peak."""

import json

import pytest
import torch

from medexgen_lib.bench import GPU_MODES, main, peak_tflops, tf32


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
