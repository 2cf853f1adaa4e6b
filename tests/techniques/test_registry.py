"""One technique, one place: every technique's folder declares all its parts, and every layer reads them.

The registry (``kubetune.techniques.MODULES``) lists a folder per technique; each declares its
number, title, spec block, rules, capabilities and hooks. These tests fail when a part is missing
(a plugin that cannot be loaded, a block without descriptions, a folder not packaged) and when
plugins reach into each other instead of going through the context and the declared capabilities.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from kubetune import techniques
from kubetune.api import TECHNIQUES, FineTuneJobSpec
from kubetune.api.crds import build_crd
from kubetune.api.techniques import TechniquesSpec
from kubetune.techniques.declarations import Capability, Declaration, Requirement
from kubetune.trainer.techniques.base import Technique, local_arranger, plugin_class

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.parent.name for p in (ROOT / "techniques").glob("*/__init__.py"))


def test_the_registry_lists_every_folder_once_in_the_briefs_order() -> None:
    assert sorted(m.rsplit(".", 1)[1] for m in techniques.MODULES) == FOLDERS
    assert [d.number for d in TECHNIQUES.values()] == list(range(1, 16))
    assert list(TECHNIQUES) == [d.key for d in techniques.registered().values()]


@pytest.mark.parametrize("key", list(TECHNIQUES))
def test_each_technique_declares_every_part(key: str) -> None:
    d = TECHNIQUES[key]
    assert d.title and not d.title.endswith(".") and "·" not in d.title
    assert d.summary, f"{key}: its spec block has no docstring (the summary docs show)"
    # The CRD field is described by number and title, made from the declaration's data.
    assert TechniquesSpec.model_fields[d.attribute].description == f"{d.number} · {d.title}."
    assert TechniquesSpec.model_fields[d.attribute].alias == key
    # Every field of the block, nested ones too, is described (kubectl explain shows it).
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["techniques"]["properties"][key]
    undocumented = [path for path, node in _walk(schema) if not node.get("description")]
    assert undocumented == []
    # Its hooks exist: a trainer plugin of the same name, or an operator hook for runs it arranges.
    if Capability.ARRANGES_RUNS in d.capabilities:
        assert d.trainer is None and d.operator
        hook = __import__(d.operator, fromlist=["x"])
        assert all(callable(getattr(hook, f)) for f in ("ensure_runs", "reconcile", "parent_name")) and hook.CHILD_LABEL
        assert callable(local_arranger(d))  # and `kubetune train` runs its runs one after another
    else:
        cls = plugin_class(d)
        assert cls is not None and issubclass(cls, Technique) and cls.name == key
        assert cls.describe is not Technique.describe, f"{key}: its plugin does not say what it did (describe)"
        assert Path(__import__(cls.__module__, fromlist=["x"]).__file__).parent == ROOT / "techniques" / d.attribute


def _walk(node: dict, path: str = "") -> list[tuple[str, dict]]:
    out = [(path, node)] if path else []
    for name, child in (node.get("properties") or {}).items():
        out += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += [(p, n) for p, n in _walk(node["items"], f"{path}[]") if n.get("properties") or p != f"{path}[]"]
    return out


def test_every_technique_folder_is_packaged_and_copied_into_the_images() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {f"kubetune.techniques.{f}" for f in FOLDERS} | {"kubetune.techniques"} <= set(packages)
    for dockerfile in ("operator.Dockerfile", "trainer.Dockerfile"):
        assert "COPY techniques/ techniques/" in (ROOT / "docker" / dockerfile).read_text()


def test_the_registry_refuses_a_technique_registered_twice() -> None:
    taken = next(iter(TECHNIQUES.values()))
    clash = Declaration(key="somethingElse", number=taken.number, title="x", spec=taken.spec)
    with pytest.raises(ValueError, match="registered twice"):
        techniques.register(clash)
    with pytest.raises(ValueError, match="registered twice"):
        techniques.register(Declaration(key=taken.key, number=99, title="x", spec=taken.spec))


def test_a_requirement_must_be_declared() -> None:
    d = Declaration(key="x", number=99, title="x", spec=TECHNIQUES["curriculum"].spec,
                    requires=lambda config: [Requirement(Capability.NEEDS_LOGITS, "x")])
    with pytest.raises(ValueError, match="without declaring"):
        d.requirements(None)


# --- plugins talk through the context and the declared capabilities ------------------------------


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_technique_imports_no_other_technique_and_reads_no_other_block(folder: str) -> None:
    others = {f for f in FOLDERS if f != folder}
    for path in (ROOT / "techniques" / folder).glob("*.py"):
        imported = {m for m in _imports(path) if m.startswith("kubetune.techniques.")}
        assert not {m for m in imported if m.split(".")[2] in others}, f"{path} imports another technique"
        if path.name == "training.py":  # the trainer plugin reads no other technique's block or name
            text = path.read_text()
            read = set(re.findall(r"spec\.techniques\.([a-z_]+)\b", text)) & others
            assert not read, f"{path} reads spec.techniques.{read}"
            keys = {TECHNIQUES_BY_FOLDER[o] for o in others}
            named = {k for k in keys if re.search(rf"[\"']{k}[\"']", text)}
            assert not named, f"{path} names other techniques {named}"


TECHNIQUES_BY_FOLDER = {d.attribute: d.key for d in TECHNIQUES.values()}


def _named_in_code(path: Path, keys: set[str]) -> set[str]:
    """Technique keys a module uses in code: ``<x>.techniques.<attribute>`` reads and the key as a string."""
    by_attribute = {TECHNIQUES[k].attribute: k for k in keys}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "techniques":
            found |= {by_attribute[node.attr]} if node.attr in by_attribute else set()
        elif isinstance(node, ast.Constant) and node.value in keys:
            found.add(node.value)
    return found


def test_the_core_calls_no_plugin_and_knows_no_technique_by_name() -> None:
    # ``task`` is the exception by design: the task decides the head, the encoding and the metrics,
    # which are the loop's own (api.specs.head, trainer.encoding); every other technique is a plugin.
    keys = set(TECHNIQUES) - {"task"}
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("kubetune.techniques.") and m.count(".") > 2}, path
    core = [*sorted((ROOT / "trainer").rglob("*.py")), *sorted((ROOT / "api").glob("*.py")), ROOT / "operator" / "handlers.py",
            ROOT / "operator" / "building.py", ROOT / "operator" / "creating.py"]
    for path in core:
        if path.name == "searching.py":  # the search's own API and trainer modules (technique 8's, by name)
            continue
        assert not _named_in_code(path, keys), f"{path.relative_to(ROOT)} names {_named_in_code(path, keys)}"


def test_packing_default_and_refusal_come_from_the_same_declarations() -> None:
    base = {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "t.jsonl", "format": "text"}]}}
    for key, block in [("distillation", {"teacher": {"source": "hf://o/t"}}), ("adversarial", {"method": "pgd"}),
                       ("regularization", {"labelSmoothing": 0.1})]:
        spec = FineTuneJobSpec.model_validate({**base, "techniques": {key: block}}, context={"skip_rules": True})
        reason = spec.packing_by_default()
        assert reason is not None
        from kubetune.api.rules import check_rules

        packed = spec.model_copy(update={"training": spec.training.model_copy(update={"packing": True})})
        assert [str(p) for p in check_rules(packed)] == [f"spec.training.packing: {reason}; turn packing off"]
