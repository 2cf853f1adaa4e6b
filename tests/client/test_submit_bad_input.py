"""``kubetune submit`` reads and validates the manifest before it connects: a wrong file is
reported as ``kubetune validate`` reports it, with or without a cluster (before, a missing
kubeconfig hid every manifest problem, and a file that is not UTF-8 ended in a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "examples" / "quickstart.yaml").read_text()


@pytest.mark.parametrize("content, said", [
    (GOOD.replace("microBatchSize: 16", "microBatchSize: 0"), "spec.training.microBatchSize: must be >= 1 (got 0)"),
    (GOOD.replace("    epochs: 2\n", "    epochs: 2\n    epochs: 3\n"), "invalid YAML: duplicate key 'epochs'"),
    (b"\xff\xfe\x00", "cannot read: not UTF-8 text (invalid start byte at byte 0)"),
    ("", "(root): no YAML document found"),
], ids=["bad value", "duplicate key", "not utf-8", "empty"])
def test_a_bad_manifest_is_reported_before_the_cluster_is_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                content: str | bytes, said: str) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = main(["submit", "-f", str(manifest), "--kubeconfig", str(tmp_path / "no-kubeconfig")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"{manifest}: ") and said in err, err
    assert "kubeconfig" not in err and "Traceback" not in err


def test_a_good_manifest_still_needs_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["submit", "-f", str(ROOT / "examples" / "quickstart.yaml"), "--kubeconfig", str(tmp_path / "no-kubeconfig")])
    assert rc == 2 and "kubeconfig" in capsys.readouterr().err
