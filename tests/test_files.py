"""Atomic artifact writes when the disk fills up (a size-limited write in a child process)."""

import json
import subprocess
import sys

import pytest

WRITE_JSON = """
import sys
from medexgen_lib.files import write_json
try:
    write_json(sys.argv[1], {"values": list(range(10_000))})
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.reliability
def test_a_full_disk_keeps_the_previous_json_and_leaves_no_temporary_file(tmp_path, full_disk):
    target = tmp_path / "metrics.json"
    target.write_text(json.dumps({"previous": True}))
    run = subprocess.run([sys.executable, "-c", WRITE_JSON, str(target)], capture_output=True, text=True,
                         preexec_fn=full_disk(4096))
    assert run.returncode == 3, run.stderr
    assert "File too large" in run.stderr
    assert json.loads(target.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
