"""Child names: deterministic, valid DNS labels for any FineTuneJob name, and never shared by two jobs."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune.operator import naming

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# FineTuneJob names are DNS subdomains (the CRD's metadata.name rule): up to 253 chars, dots allowed.
SUBDOMAIN = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,250}[a-z0-9])?\Z", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(SUBDOMAIN)
def test_every_child_name_is_a_valid_label_for_any_job_name(name: str) -> None:
    names = naming.names_for(name)
    for value in (names.job, names.config_map, names.claim, names.service_account, names.role, names.role_binding):
        assert DNS_LABEL.match(value) and len(value) <= 63, value
    assert DNS_1035.match(names.service) and len(names.service) <= 63
    assert len(f"{names.job}-1023") <= 63
    assert names == naming.names_for(name)  # deterministic
    assert DNS_LABEL.match(naming.label_value(name)) and len(naming.label_value(name)) <= 63


@settings(max_examples=200, deadline=None)
@given(SUBDOMAIN, SUBDOMAIN)
def test_different_jobs_get_different_names(a: str, b: str) -> None:
    if a != b:
        assert naming.names_for(a).job != naming.names_for(b).job
        assert naming.names_for(a).claim != naming.names_for(b).claim


def test_short_names_are_kept_as_written() -> None:
    names = naming.names_for("llama-sft")
    assert (names.job, names.service, names.config_map, names.claim) == (
        "llama-sft", "llama-sft", "llama-sft-config", "llama-sft-workspace")
    assert names.master_addr() == "llama-sft-0.llama-sft"


def test_long_names_sharing_a_prefix_do_not_collide() -> None:
    a, b = "x" * 70 + "-one", "x" * 70 + "-two"
    assert naming.names_for(a).job != naming.names_for(b).job
    assert naming.names_for(a).job.startswith("x" * 40)
