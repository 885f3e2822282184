"""The benchmark's quick mode runs and writes its JSON (the figures themselves are not tested)."""

import json

from medexgen_lib.bench import main


def test_quick_benchmark_writes_a_report(tmp_path, capsys):
    assert main(["--quick", "-p", "paths.output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "logs" / "bench" / "quick.json").read_text())
    for key in ("machine", "image_cache_speedup_512", "image_cache_speedup_2048",
                "generation_kv_speedup", "training"):
        assert key in report
    assert report["generation"]["identical_outputs"] is True
    assert report["machine"]["cores"] >= 1
    assert "speedup" in capsys.readouterr().out
