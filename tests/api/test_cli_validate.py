"""`kubetune validate`: exit 0 when valid, else exit 1 and one line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "examples" / "quickstart.yaml").read_text()
BAD = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: bad}
spec:
  model: {source: hf://org/model}
  data:
    datasets: [{source: d.jsonl, format: text}]
  peft: {method: lora, r: -4, alpah: 3}
"""


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune", "validate", *args], input=stdin, capture_output=True, text=True, cwd=ROOT)


def test_valid_file_exits_zero() -> None:
    result = _run("-f", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quickstart: valid" in result.stdout


def test_invalid_file_lists_each_problem_with_file_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    result = _run("-f", str(bad))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert f"{bad}: spec.peft.r: must be >= 1 (got -4)" in lines
    assert f"{bad}: spec.peft.alpah: unknown field; did you mean 'alpha'?" in lines
    assert len(lines) == 2


def test_stdin_and_several_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    # From stdin, relative data paths resolve against the working directory, where the
    # quickstart's data is not: the manifest alone is checked here.
    result = _run("--no-data-check", "-f", "-", "-f", str(bad), stdin=GOOD)
    assert result.returncode == 1
    assert "<stdin>: quickstart: valid" in result.stdout
    assert f"{bad}: spec.peft.r" in result.stdout


def test_positional_files_work_too() -> None:
    assert _run("examples/quickstart.yaml").returncode == 0


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec:\n  model: {source: x\n  data: [\n")
    result = _run("-f", str(broken))
    assert result.returncode == 1
    assert f"{broken}: line " in result.stdout and ", column " in result.stdout and "invalid YAML" in result.stdout


def test_multi_document_file_names_the_document(tmp_path: Path) -> None:
    multi = tmp_path / "multi.yaml"
    multi.write_text(GOOD + "\n---\n" + BAD)
    result = _run("-f", str(multi))
    assert result.returncode == 1
    assert "document 2 (line" in result.stdout and "spec.peft.r" in result.stdout


def test_missing_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """One line like any other problem, the same from validate, render and train (all read the file
    through kubetune.api.validating.validate_file); the other files are still checked."""
    missing = tmp_path / "nope.yaml"
    result = _run("-f", str(missing), "-f", "examples/quickstart.yaml")
    assert result.returncode == 1
    assert f"{missing}: cannot read: No such file or directory" in result.stdout.splitlines()
    assert "quickstart: valid" in result.stdout and "Traceback" not in result.stdout + result.stderr
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    assert f"{binary}: cannot read: not UTF-8 text" in _run("-f", str(binary)).stdout
    for command, code in (["render"], 1), (["train", "--no-progress"], 2):
        other = subprocess.run([sys.executable, "-m", "kubetune", *command, "-f", str(missing)], capture_output=True, text=True, cwd=ROOT)
        assert other.returncode == code, other.stderr
        assert other.stderr.strip().splitlines() == [f"{missing}: cannot read: No such file or directory"], command


def test_wrong_kind_is_reported() -> None:
    result = _run("-f", "-", stdin="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert result.returncode == 1
    assert "apiVersion" in result.stdout and "kind" in result.stdout


def test_preview_shows_examples_as_the_model_reads_them() -> None:
    """The prompt template is applied in the preview (validate and render)."""
    result = _run("--preview", "1", "examples/prompt-engineering.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example 1:" in result.stdout and "Sentiment:" in result.stdout and "Review: " in result.stdout
    rendered = subprocess.run(
        [sys.executable, "-m", "kubetune", "render", "--preview", "1", "-f", "examples/prompt-engineering.yaml"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.startswith("# preview of prompt-engineering:") and "#   | text: Review: " in rendered.stdout


def _job_with_data(tmp_path: Path, rows: str | None, source: str = "reviews.jsonl") -> Path:
    """The quickstart manifest next to its own data file (``rows``; None: no file at all)."""
    if rows is not None:
        (tmp_path / "reviews.jsonl").write_text(rows)
    job = tmp_path / "job.yaml"
    job.write_text(GOOD.replace("source: data/reviews.jsonl", f"source: {source}"))
    return job


def test_data_it_cannot_read_is_not_valid(tmp_path: Path) -> None:
    missing = _run("-f", str(_job_with_data(tmp_path, None)))
    assert missing.returncode == 1 and "valid" not in missing.stdout.replace("--no-data-check", "")
    assert "spec.data.datasets[0].source" in missing.stdout and "does not exist" in missing.stdout
    assert "--no-data-check" in missing.stdout

    malformed = _run("-f", str(_job_with_data(tmp_path, '{"text": "fine", "label": "positive"}\n{"text": oops\n')))
    assert malformed.returncode == 1, malformed.stdout
    assert "reviews.jsonl" in malformed.stdout and "row 2" in malformed.stdout, malformed.stdout

    no_label = _run("-f", str(_job_with_data(tmp_path, '{"text": "fine", "label": "positive"}\n{"text": "no label"}\n')))
    assert no_label.returncode == 1, no_label.stdout
    assert "row 2" in no_label.stdout and "label" in no_label.stdout, no_label.stdout
    assert len(no_label.stdout.strip().splitlines()) == 1  # one line per problem, no traceback
    assert "Traceback" not in no_label.stderr


def test_data_checks_can_be_skipped_and_remote_sources_are_left_to_the_trainer(tmp_path: Path) -> None:
    job = _job_with_data(tmp_path, None)
    skipped = _run("--no-data-check", "-f", str(job))
    assert skipped.returncode == 0 and "quickstart: valid" in skipped.stdout, skipped.stdout + skipped.stderr
    hub = _run("-f", str(_job_with_data(tmp_path, None, source="hf://org/reviews")))
    assert hub.returncode == 0, hub.stdout + hub.stderr



def test_each_data_problem_names_the_dataset_it_is_in(tmp_path: Path, capsys) -> None:
    """With several datasets, a bad row says which one: the line starts with the field path, as
    every other problem of `kubetune validate` does, then the file and the row."""
    from kubetune.cli import main

    (tmp_path / "broken.jsonl").write_text('{"text": "fine", "label": "good"}\n{"text": "meh"\n')
    (tmp_path / "nolabel.jsonl").write_text('{"text": "fine"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(GOOD.split("spec:")[0] + """spec:
  model: {source: hf://org/model}
  techniques: {task: {type: classification}}
  data:
    datasets:
      - {source: missing.jsonl, format: classification}
      - {source: broken.jsonl, format: classification}
      - {source: nolabel.jsonl, format: classification}
      - {source: hf://org/data, format: classification}
""")
    assert main(["validate", "-f", str(job)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, lines  # the hf:// source is the trainer's to read
    assert lines[0].startswith(f"{job}: spec.data.datasets[0].source: {tmp_path / 'missing.jsonl'} does not exist")
    assert lines[1] == f"{job}: spec.data.datasets[1].source: {tmp_path / 'broken.jsonl'}: row 2: invalid JSON (Expecting ',' delimiter at column 1)"
    assert lines[2].startswith(f"{job}: spec.data.datasets[2].source: {tmp_path / 'nolabel.jsonl'}: row 1, field 'label': missing")
