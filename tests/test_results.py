"""The results page and the result files: every figure docs/results.md quotes equals its file,
the check catches a figure that does not, and every result written carries its provenance."""

import json
import re
import subprocess
from pathlib import Path

from service.cli import main as cli_main
from training.analysis.provenance import git_state
from training.analysis.results_check import check_page, mismatch, quoted_figures, resolve
from training.data.datasets import files_digest
from training.learning.checkpoint import model_version, restore_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_every_figure_on_the_results_page_equals_its_result_file():
    checked, problems = check_page(ROOT / "docs" / "results.md", ROOT)
    assert problems == []
    assert checked >= 20  # the page quotes its figures in checked tables


def test_the_results_page_is_a_page_not_a_log():
    assert len((ROOT / "docs" / "results.md").read_text().splitlines()) <= 300


def test_no_python_outside_the_packages_the_suite_runs():
    """A probe a later session needs is a command with a test, not a script beside results."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    present = [path for path in listed if (ROOT / path).exists()]
    assert "training/cli.py" in present
    allowed = ("training", "service", "tests", "docs")
    assert [path for path in present if Path(path).parts[0] not in allowed] == []


def test_the_check_reads_rates_counts_and_numbers():
    summary = {"success": 0.95, "interval": [0.894, 0.981], "episodes": 100}
    assert mismatch("95 [89, 98]", summary) is None
    assert mismatch("96 [89, 98]", summary) == "the file says 95 [89, 98]"
    assert mismatch("95 of 100", summary) is None
    assert mismatch("94 of 100", summary) == "the file says 95 of 100"
    assert mismatch("10.1 ms", 10.149) is None
    assert mismatch("10.2 ms", 10.149) == "the file says 10.1"
    assert mismatch("1,564 s", 1563.7) is None
    assert mismatch("7.7×", 7.72) is None
    assert mismatch("95 [89, 98]", 0.95) == "a rate needs an object with success and interval"
    assert "not a figure" in mismatch("most of them", 3)


def test_the_check_finds_each_kind_of_broken_row(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)
    record = {"results": [{"summary": {"success": 0.5, "interval": [0.3, 0.7]}}], "a/b": 2.5}
    (tmp_path / "results" / "x" / "r.json").write_text(json.dumps(record))
    page = tmp_path / "results.md"
    page.write_text(
        "| what | figure | source |\n|---|---|---|\n"
        "| ok | **50 [30, 70]** | `results/x/r.json#/results/0/summary` |\n"
        "| ok, a key with a slash | 2.5 | `results/x/r.json#/a~1b` |\n"
        "| wrong | 51 [30, 70] | `results/x/r.json#/results/0/summary` |\n"
        "| no such key | 1 | `results/x/r.json#/nothing` |\n"
        "| no such file | 1 | `results/x/gone.json#/a` |\n"
        "| no source | 1 | |\n"
        "\n| a table of other things | value |\n|---|---|\n| unchecked | 3 |\n"
    )
    assert [f.line for f in quoted_figures(page.read_text())] == [3, 4, 5, 6, 7, 8]
    assert resolve(record, "/a~1b") == 2.5
    checked, problems = check_page(page, tmp_path)
    assert checked == 6
    assert [int(p.split(":")[1]) for p in problems] == [5, 6, 7, 8]
    assert "the file says 50 [30, 70]" in problems[0]
    assert "holds nothing at /nothing" in problems[1]
    assert "does not exist" in problems[2]


def test_results_check_command_fails_on_a_wrong_figure(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text('{"ms": 4.0}')
    page = tmp_path / "page.md"
    page.write_text("| figure | source |\n|---|---|\n| 4.0 ms | `results/r.json#/ms` |\n")
    argv = ["results", "check", "--page", str(page), "--root", str(tmp_path)]
    assert cli_main(argv) == 0
    page.write_text("| figure | source |\n|---|---|\n| 4.1 ms | `results/r.json#/ms` |\n")
    assert cli_main(argv) == 2
    assert "1 of 1 figures differ" in capsys.readouterr().err


def test_eval_records_where_its_result_came_from(trained, umaze_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", str(trained.run_dir), "--goals", "2", "--max-steps", "3", "--quiet"]
    assert cli_main([*argv, "--planner", "random_shooting", "--out", str(out)]) == 0
    origin = json.loads((out / "eval.json").read_text())["provenance"]
    assert origin["commit"] == git_state()["commit"]
    if origin["commit"] is not None:  # a checkout: the commit and whether it was changed
        assert re.fullmatch(r"[0-9a-f]{40}", origin["commit"])
        assert isinstance(origin["dirty"], bool)
    bundle = restore_bundle(trained.run_dir)
    assert origin["model_version"] == model_version(bundle)
    assert origin["dataset"]["settings"]["episodes"] == 4  # the dataset's sidecar
    assert origin["dataset"]["sha256"] == files_digest(umaze_data)
    assert origin["settings"] == {
        "seed": 0, "planners": ["random_shooting"], "goals": 2, "episodes_per_goal": 1,
        "rare_only": False, "max_steps": 3,
    }  # fmt: skip
    assert origin["machine"]["cores"] >= 1


def test_only_the_project_s_own_checkout_names_a_commit(tmp_path):
    """Installed inside another repository (a venv in someone's project), the code's commit
    is not that repository's."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "inner").mkdir()
    assert git_state(tmp_path / "inner") == {"commit": None, "dirty": None}
    assert git_state(tmp_path)["commit"] is None  # the top, with no commit yet


def test_a_dataset_digest_follows_its_bytes(tmp_path):
    (tmp_path / "d" / "data").mkdir(parents=True)
    (tmp_path / "d" / "data" / "main.bin").write_bytes(b"abc")
    before = files_digest(tmp_path / "d")
    assert files_digest(tmp_path / "d") == before
    (tmp_path / "d" / "data" / "main.bin").write_bytes(b"abd")
    assert files_digest(tmp_path / "d") != before
    assert files_digest(tmp_path / "nothing") is None
