"""The FineTuneJob contract: spec and status models, validation, CRD generation.

This is the one place field names are defined. The operator validates applied objects with it,
the trainer parses its config with it, and ``crds/`` is generated from it. It imports no torch,
transformers, deepspeed or kopf, so the operator image stays small (a test checks this).
"""

from kubetune.api.jobs import (
    API_VERSION,
    CRD_NAME,
    GROUP,
    KIND,
    KUEUE_QUEUE_LABEL,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJob,
)
from kubetune.api.problems import Problem, SpecError
from kubetune.api.specs import FineTuneJobSpec
from kubetune.api.statuses import (
    PHASES,
    TERMINAL_PHASES,
    ConditionType,
    FineTuneJobStatus,
    Reason,
)
from kubetune.api.techniques import TECHNIQUES, TechniqueInfo
from kubetune.api.validating import load_documents, parse_job, parse_spec, validate_manifest, validate_text

__all__ = [
    "API_VERSION",
    "CRD_NAME",
    "GROUP",
    "KIND",
    "KUEUE_QUEUE_LABEL",
    "PHASES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "TECHNIQUES",
    "TERMINAL_PHASES",
    "VERSION",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Problem",
    "Reason",
    "SpecError",
    "TechniqueInfo",
    "load_documents",
    "parse_job",
    "parse_spec",
    "validate_manifest",
    "validate_text",
]
