"""The trimmed reliability table (`benchmarks/reliability.py --quick`): every category tried, none answered wrong."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = {
    "image modes", "bad files", "tensors", "NaN paths", "resume kills", "server auth", "traversal",
    "malformed commits", "concurrent commits (one server)", "concurrent commits (two servers)",
    "concurrent downloads (sha256)", "kill -9 during commit storm",
}


@pytest.mark.needs_train_extra  # its "resume kills" and "NaN paths" categories run the training scripts
def test_quick_reliability_table_has_no_wrong_answer(tmp_path):
    output = tmp_path / "reliability.json"
    result = subprocess.run([sys.executable, "benchmarks/reliability.py", "--quick", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    table = json.loads(output.read_text())
    wrong = {name: category["wrong_cases"] for name, category in table["categories"].items() if category["wrong"]}
    assert result.returncode == 0 and not wrong, (wrong, result.stderr[-3000:])
    assert set(table["categories"]) == CATEGORIES
    for name, category in table["categories"].items():
        assert category["tried"] > 0 and category["correct"] == category["tried"], name
    assert table["total"]["wrong"] == 0 and table["quick"] is True
