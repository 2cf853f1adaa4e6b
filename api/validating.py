"""Turning YAML into a validated FineTuneJob, or into problems a person can act on.

Called by ``kubetune validate`` and ``kubetune train`` (files), the operator (a body from the
API server) and the trainer (its JSON config). Pydantic does the field checks; this module
translates its errors into ``spec.peft.r: must be >= 1 (got -4)``, adds did-you-mean hints for
unknown fields, then runs the cross-field rules with precise paths.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.jobs import KIND, FineTuneJob
from kubetune.api.problems import Problem, SpecError, format_path
from kubetune.api.rules import check_rules
from kubetune.api.specs import FineTuneJobSpec

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "finite_number": "a finite number",
}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "nullable"}
_NAME_HINT = "must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (a Kubernetes name)"
_PATTERN_WORDS = {  # the field vocabulary of kubetune.api.base, in words rather than as a regex
    r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$": "must be a Kubernetes quantity: a number and an optional unit, no space, such as 64Gi, 500Mi, 500m or 8",
    r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$": _NAME_HINT,
    r"^[A-Za-z0-9_.\-]+$": "must be a column name of letters, digits, '_', '.' and '-'",
}
#: Names of one number format: training.precision says bf16, model.dtype bfloat16 (as torch does).
_SAME_DTYPE = {"bfloat16": "bf16", "bf16": "bfloat16", "float16": "fp16", "fp16": "float16", "half": "fp16",
               "float32": "fp32", "fp32": "float32", "float": "fp32"}
_SOURCE_HINT = "must be hf://org/name[@revision], pvc://claim/path, s3://bucket/key, pkg://package/path or a file path"


class ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made to read a manifest as kubectl does (YAML 1.2 numbers, no
    duplicate keys); PyYAML itself stays: the difference is two rules, not a reason for another parser.

    * ``learningRate: 1e-4`` is a number: YAML 1.1 (PyYAML's default) reads an exponent without
      a dot or a sign as a string, so a manifest ``kubectl apply`` takes would be refused.
    * A key given twice in one mapping is an error with both lines, as ``kubectl apply`` makes it:
      PyYAML would keep the last value and silently drop the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}); keep one of them",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Document:
    """One YAML document of a file, with the line it starts on (1-based)."""

    body: Any
    line: int


def load_documents(text: str, filename: str = "<stdin>") -> list[Document]:
    """Every non-empty YAML document in ``text``; a syntax error names the line and column."""
    try:
        loader = ManifestLoader(text)
        docs = []
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                docs.append(Document(loader.construct_document(node), node.start_mark.line + 1))
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(f"{filename}: {where}", f"invalid YAML: {problem}")]) from None
    return [d for d in docs if d.body is not None]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_names_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The YAML field names allowed at ``loc`` (the parent of an unknown key)."""
    model: Any = root
    for key in loc:
        if isinstance(key, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        found = None
        for name, info in model.model_fields.items():
            if (info.alias or name) == key or name == key:
                found = info.annotation
        if found is None:
            return None
        model = _innermost_model(found)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return None


def _innermost_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _innermost_model(arg)
        if found is not None:
            return found
    return None


def _model_or_list(annotation: Any) -> tuple[Any, bool]:
    """(the model a field's value is validated as, whether it is a list of them); (None, False) for
    anything else — a mapping of free keys (nodeSelector, deepspeed.config) is not walked."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin in (list, tuple):
        inner, _ = _model_or_list(next(iter(get_args(annotation)), None))
        return inner, inner is not None
    if origin is dict:
        return None, False
    for arg in get_args(annotation):  # Optional[...], Annotated[...], unions
        found = _model_or_list(arg)
        if found[0] is not None:
            return found
    return None, False


def python_names(body: Any, model: type[BaseModel], loc: tuple[str | int, ...] = ()) -> list[Problem]:
    """Keys spelled as the Python field (``learning_rate``) where the manifest's name is
    ``learningRate``. The models accept both (code builds them by Python name), the CRD only the
    latter: the API server refuses such a key (or prunes it, and the value is lost without a
    word), so a manifest must not pass here with it."""
    if not isinstance(body, dict):
        return []
    out: list[Problem] = []
    by_key: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        by_key[alias] = info.annotation
        if alias != name and name in body:
            out.append(Problem(format_path((*loc, name)), f"unknown field; did you mean {alias!r}?"))
    for key, value in body.items():
        if key not in by_key:
            continue
        inner, is_list = _model_or_list(by_key[key])
        if inner is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                out.extend(python_names(item, inner, (*loc, key, i)))
        elif not is_list:
            out.extend(python_names(value, inner, (*loc, key)))
    return out


def _message(err: dict[str, Any], root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        loc = tuple(err["loc"])
        allowed = _field_names_at(root, loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if close:
            return f"unknown field; did you mean {close[0]!r}?"
        return f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = ctx.get({"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}[kind])
        return f"must be {op} {bound} (got {_describe(value)})"
    if kind == "literal_error":
        expected = str(ctx.get("expected"))
        if " or " not in expected and ", " not in expected:  # one allowed value: "must be one of 'X'" reads oddly
            return f"must be {expected} (got {_describe(value)})"
        hint = ""
        if isinstance(value, str):  # LoRA, classifcation, constant_with_warmup: name the value meant
            allowed = re.findall(r"'([^']*)'", expected)
            folded = {a.lower().replace("_", "-"): a for a in allowed}
            close = difflib.get_close_matches(value.lower().replace("_", "-"), list(folded), n=1, cutoff=0.75)
            same = _SAME_DTYPE.get(value.lower())
            meant = same if same in allowed else folded[close[0]] if close else None
            hint = f"; did you mean {meant!r}?" if meant else ""
        return f"must be one of {expected} (got {_describe(value)}){hint}"
    if kind == "string_pattern_mismatch":
        if str(err["loc"][-1]) in {"source", "tokenizer"}:
            return f"{_SOURCE_HINT} (got {_describe(value)})"
        if tuple(err["loc"][-2:]) in {("metadata", "name"), ("metadata", "namespace")} or ctx.get("pattern") in _PATTERN_WORDS:
            return f"{_PATTERN_WORDS.get(str(ctx.get('pattern')), _NAME_HINT)} (got {_describe(value)})"
        return f"must match {ctx.get('pattern')} (got {_describe(value)})"
    if kind in {"string_too_short", "too_short"}:
        n = ctx.get("min_length")
        return "must not be empty" if n == 1 else f"needs at least {n} {'characters' if kind.startswith('string') else 'items'}"
    if kind in {"string_too_long", "too_long"}:
        return f"must have at most {ctx.get('max_length')} {'characters' if kind.startswith('string') else 'items'}"
    if kind in _TYPE_WORDS:
        got = "null" if value is None else f"{type(value).__name__} {_describe(value)}"
        return f"must be {_TYPE_WORDS[kind]} (got {got})"
    if kind == "invalid_key":
        return f"keys must be strings (got {_describe(err['loc'][-1])}; quote it)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def problems_from(error: ValidationError, root: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Problem]:
    """Pydantic's errors as problems with YAML field paths, one per path."""
    out: list[Problem] = []
    seen: set[str] = set()
    for err in error.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or p.startswith(("literal[", "function-")))))
        path = format_path(prefix + loc)
        if path in seen:
            continue
        seen.add(path)
        if _names_a_secret(loc):
            err = {**err, "input": "<hidden>", "ctx": {k: v for k, v in (err.get("ctx") or {}).items() if k != "error"}}
        out.append(Problem(path, _message({**err, "loc": loc}, root)))
    return out


def _names_a_secret(loc: tuple[Any, ...]) -> bool:
    """Whether a field path goes through a Secret reference (``credentialsSecret``, ``…SecretRef``):
    what a user typed there may be the credential itself, pasted by mistake, and problems end up in
    status, Events and logs — so its value is never echoed."""
    return any(isinstance(p, str) and p.lower().endswith(("secret", "secretref")) for p in loc)


def validate_manifest(body: Any) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one manifest; returns the job (None when invalid) and every problem found."""
    if not isinstance(body, dict):
        return None, [Problem("(root)", f"a FineTuneJob manifest must be a mapping, got {type(body).__name__}")]
    kind = body.get("kind")
    if isinstance(kind, str) and kind != KIND:
        # Another object (a Deployment, a ConfigMap): one line, not one per field it lacks.
        api = body.get("apiVersion")
        got = f"{_describe(kind)}, apiVersion {_describe(api)}" if api is not None else _describe(kind)
        return None, [Problem("kind", f"must be FineTuneJob with apiVersion kubetune.io/v1alpha1 (got {got}); "
                                      "kubetune reads FineTuneJob manifests only: keep other objects in another file")]
    misnamed = python_names(body, FineTuneJob)
    try:
        job = FineTuneJob.model_validate(body, context={"skip_rules": True})
    except ValidationError as exc:
        return None, _merged(misnamed, problems_from(exc, FineTuneJob))
    if misnamed:
        return None, misnamed
    problems = check_rules(job.spec)
    return (None, problems) if problems else (job, [])


def _merged(first: list[Problem], then: list[Problem]) -> list[Problem]:
    """Both lists, one problem per path (the first list's wins)."""
    paths = {p.path for p in first}
    return first + [p for p in then if p.path not in paths]


def parse_job(body: Any) -> FineTuneJob:
    """A validated FineTuneJob, or SpecError listing every problem."""
    job, problems = validate_manifest(body)
    if job is None:
        raise SpecError(problems)
    return job


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """A validated spec (the body of ``spec:``), or SpecError with ``spec.``-prefixed paths."""
    misnamed = python_names(spec, FineTuneJobSpec, ("spec",))
    try:
        parsed = FineTuneJobSpec.model_validate(spec, context={"skip_rules": True})
    except ValidationError as exc:
        raise SpecError(_merged(misnamed, problems_from(exc, FineTuneJobSpec, prefix=("spec",)))) from None
    if misnamed:
        raise SpecError(misnamed)
    problems = check_rules(parsed)
    if problems:
        raise SpecError(problems)
    return parsed


def validate_text(text: str, filename: str) -> tuple[list[FineTuneJob], list[Problem]]:
    """Every FineTuneJob in a YAML file; problems are prefixed with the document when there are several."""
    docs = load_documents(text, filename)
    jobs: list[FineTuneJob] = []
    problems: list[Problem] = []
    if not docs:
        return [], [Problem("(root)", "no YAML document found")]
    for index, doc in enumerate(docs):
        job, found = validate_manifest(doc.body)
        if job is not None:
            jobs.append(job)
        where = f"document {index + 1} (line {doc.line}): " if len(docs) > 1 else ""
        problems.extend(Problem(f"{where}{p.path}", p.message) for p in found)
    return jobs, problems


def validate_file(path: str) -> tuple[str, list[FineTuneJob], list[str]]:
    """Read and validate one manifest file (``-`` is stdin), as every command that takes ``-f``
    does: its display name, the valid FineTuneJobs, and one line per problem, each starting with
    the file's name (``job.yaml: spec.peft.r: must be >= 1 (got -4)``). An unreadable file is one
    such problem (``job.yaml: cannot read: No such file or directory``), so every caller reports it
    as it reports the others."""
    name = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return name, [], [f"{name}: cannot read: {exc.strerror or exc}"]
    except UnicodeDecodeError as exc:
        return name, [], [f"{name}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"]
    try:
        jobs, problems = validate_text(text, name)
    except SpecError as exc:  # YAML syntax: the path already names the file, line and column
        return name, [], [str(p) if p.path.startswith(name) else f"{name}: {p}" for p in exc.problems]
    return name, jobs, [f"{name}: {p}" for p in problems]
