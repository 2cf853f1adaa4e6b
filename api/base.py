"""The base every FineTuneJob model inherits, and the small field vocabulary they share.

Manifests are YAML written by people, so the models use camelCase aliases (the Kubernetes
convention), reject unknown fields, and are strict about types: a string where a number belongs
is an error, not a silent coercion. Strictness is also what keeps these models and the generated
CRD schema in agreement (see ``tests/api/test_crd_agreement.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """A block of the FineTuneJob: camelCase in YAML, snake_case in Python, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        validate_default=False,
        use_attribute_docstrings=False,
    )

    def to_manifest(self) -> dict[str, Any]:
        """The block as it would appear in YAML: aliases, JSON types, unset defaults left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


#: A Kubernetes resource quantity such as ``4Gi``, ``500m`` or ``2``.
Quantity = Annotated[
    str,
    Field(
        pattern=r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$",
        max_length=64,
        json_schema_extra={"examples": ["4Gi", "500m"]},
    ),
]

#: A DNS-1123 name of an object in the job's namespace (a Secret, a claim, a class).
ObjectName = Annotated[
    str,
    Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", min_length=1, max_length=253),
]

#: A fraction in [0, 1].
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

#: A probability of applying something, in [0, 1].
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

#: A module name, regex or glob over parameter names.
Pattern = Annotated[str, Field(min_length=1, max_length=256)]

#: A column of a dataset.
ColumnName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
