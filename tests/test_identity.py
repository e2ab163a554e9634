"""The identity matcher as pure functions: patterns, SPIFFE rules, admission."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.identity import AllowList, Identity, check_uri_pattern, is_spiffe_id, rfc4514
from tests.pki import CA

WEB = "spiffe://prod.example/ns/web/sa/frontend"


def identity(*uris: str, dns: tuple[str, ...] = (), cn: str = "x", ou: str = "") -> Identity:
    return Identity(subject=f"CN={cn}", uris=uris, dns=dns, cn=(cn,), ou=(ou,) if ou else ())


@pytest.mark.parametrize(
    ("pattern", "uri", "admitted"),
    [
        (WEB, WEB, True),
        (WEB, WEB + "x", False),
        (WEB, WEB + "/more", False),
        ("spiffe://prod.example/ns/batch/**", "spiffe://prod.example/ns/batch/sa/cron", True),
        ("spiffe://prod.example/ns/batch/**", "spiffe://prod.example/ns/batch", True),
        ("spiffe://prod.example/ns/batch/**", "spiffe://prod.example/ns/batchx", False),
        ("spiffe://prod.example/ns/batch/**", "spiffe://staging.example/ns/batch/sa/a", False),
        ("spiffe://prod.example/ns/*/sa/api", "spiffe://prod.example/ns/pay/sa/api", True),
        ("spiffe://prod.example/ns/*/sa/api", "spiffe://prod.example/ns/a/b/sa/api", False),
        ("spiffe://prod.example/ns/*", "spiffe://prod.example/ns/", False),
        ("spiffe://prod.example/ns/*", "spiffe://prod.example/ns", False),
        # an invalid SPIFFE ID cannot walk out of a `**` prefix
        ("spiffe://prod.example/ns/batch/**", "spiffe://prod.example/ns/batch/../../admin", False),
        ("spiffe://prod.example/ns/**", "spiffe://prod.example/ns/a?x=1", False),
        # the trust domain is lower-case in every valid SPIFFE ID
        (WEB, WEB.replace("prod", "PROD"), False),
        # other schemes: the same wildcard rules, no SPIFFE checks
        ("https://id.example/users/*", "https://id.example/users/alice", True),
        ("https://id.example/users/*", "https://id.example/users/alice/x", False),
        ("urn:example:client", "urn:example:client", True),
        # regex metacharacters in a pattern are literal
        ("spiffe://prod.example/a.b", "spiffe://prod.example/aXb", False),
    ],
)
def test_uri_patterns(pattern: str, uri: str, admitted: bool) -> None:
    assert AllowList(uri=[pattern]).admits(identity(uri)) is admitted


def test_a_certificate_with_two_spiffe_ids_matches_no_uri_entry() -> None:
    allow = AllowList(uri=[WEB, "spiffe://prod.example/**", "urn:example:client"])
    assert allow.admits(identity(WEB))
    assert not allow.admits(identity(WEB, "spiffe://prod.example/ns/other"))
    assert not allow.admits(identity(WEB, "spiffe://prod.example/ns/other", "urn:example:client"))


def test_a_non_spiffe_uri_beside_one_spiffe_id_is_matched_too() -> None:
    allow = AllowList(uri=["urn:example:client"])
    assert allow.admits(identity("spiffe://prod.example/a", "urn:example:client"))


@pytest.mark.parametrize(
    ("pattern", "name", "admitted"),
    [
        ("*.jobs.internal.example", "cron.jobs.internal.example", True),
        ("*.jobs.internal.example", "CRON.Jobs.Internal.Example", True),
        ("*.jobs.internal.example", "jobs.internal.example", False),
        ("*.jobs.internal.example", "a.b.jobs.internal.example", False),
        ("*.jobs.internal.example", "*.jobs.internal.example", False),  # names no one host
        ("*.jobs.internal.example", ".jobs.internal.example", False),  # an empty label neither
        ("*.jobs.internal.example", "a..jobs.internal.example", False),
        ("billing.internal.example", "billing.internal.example", True),
        ("billing.internal.example", "Billing.Internal.Example.", True),
        ("billing.internal.example", "x.billing.internal.example", False),
    ],
)
def test_dns_patterns(pattern: str, name: str, admitted: bool) -> None:
    assert AllowList(dns=[pattern]).admits(identity(dns=(name,))) is admitted


def test_cn_and_ou_are_exact() -> None:
    allow = AllowList(cn=["legacy-billing"], ou=["payments"])
    assert allow.admits(identity(cn="legacy-billing"))
    assert not allow.admits(identity(cn="Legacy-Billing"))
    assert not allow.admits(identity(cn="legacy-billing-2"))
    assert allow.admits(identity(ou="payments"))
    assert not allow.admits(identity(ou="payments-eu"))


def test_any_match_of_any_list_admits_and_an_empty_table_admits_no_one() -> None:
    allow = AllowList(uri=[WEB], dns=["a.example"], cn=["c"], ou=["o"])
    assert allow.admits(identity(WEB))
    assert allow.admits(identity(dns=("a.example",)))
    assert allow.admits(identity(cn="c"))
    assert allow.admits(identity(ou="o"))
    assert not allow.admits(identity("spiffe://prod.example/ns/other", dns=("b.example",)))
    assert not AllowList().admits(identity(WEB, dns=("a.example",), cn="c", ou="o"))


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "must not be empty"),
        ("spiffe://Prod.example/ns/web", "trust domain 'Prod.example' must be lower-case"),
        ("spiffe://*.example/ns/web", "no wildcard"),
        ("spiffe://prod.example:8443/ns/web", "no port"),
        ("spiffe://user@prod.example/ns/web", "no userinfo"),
        ("spiffe://prod.example/ns/web?x=1", "no query or fragment"),
        ("spiffe://prod.example/ns/web#frag", "no query or fragment"),
        ("spiffe://prod.example/ns//web", "no empty path segment"),
        ("spiffe://prod.example/ns/web/", "no empty path segment"),
        ("spiffe://prod.example/ns/../web", "no '.' or '..' path segment"),
        ("spiffe://prod.example/./web", "no '.' or '..' path segment"),
        ("spiffe://prod.example/ns/**/web", "'**' may only be the last path segment"),
        ("spiffe://prod.example/ns/web-*", "'*' must be a whole path segment"),
        ("spiffe://prod.example/ns/w%20b", "path segment 'w%20b' must be letters"),
        ("spiffe:///ns/web", "the trust domain is missing"),
        ("SPIFFE://prod.example/ns/web", "the scheme of a SPIFFE ID is lower-case"),
        ("ns/web/*", "must be an absolute URI with a scheme"),
        ("https://a.example/**/x", "'**' may only be the last path segment"),
        ("spiffe://prod.example/" + "a" * 2048, "at most 2048 bytes"),
    ],
)
def test_invalid_uri_patterns_say_why(pattern: str, problem: str) -> None:
    found = check_uri_pattern(pattern)
    assert found is not None
    assert problem in found
    with pytest.raises(ValueError, match="invalid uri pattern"):
        AllowList(uri=[pattern])


@pytest.mark.parametrize(
    "pattern",
    [
        WEB,
        "spiffe://prod.example",
        "spiffe://prod.example/**",
        "spiffe://prod.example/ns/*/sa/*",
        "spiffe://td_with-all.chars0/A.b-c_D",
        "https://id.example/users/*",
    ],
)
def test_valid_uri_patterns(pattern: str) -> None:
    assert check_uri_pattern(pattern) is None


@pytest.mark.parametrize(
    ("uri", "valid"),
    [
        (WEB, True),
        ("spiffe://prod.example", True),
        ("spiffe://prod.example/", False),
        ("spiffe://prod.example/a/../b", False),
        ("spiffe://prod.example/a/./b", False),
        ("spiffe://prod.example:1/a", False),
        ("spiffe://Prod.example/a", False),
        ("spiffe://prod.example/a?b", False),
        ("spiffe://prod.example/" + "a" * 2048, False),
    ],
)
def test_spiffe_id_validity(uri: str, valid: bool) -> None:
    assert is_spiffe_id(uri) is valid


def test_identity_from_a_real_certificate(tmp_path: Path) -> None:
    """What `getpeercert()` returns (CPython's own decoder) for a certificate
    made with DNS and URI SANs."""
    ca = CA(tmp_path)
    leaf = ca.issue("client", "a.example", "b.example", uris=(WEB,), client=True)
    decoded = ssl._ssl._test_decode_cert(str(leaf.cert))  # type: ignore[attr-defined]
    found = Identity.from_peercert(decoded)
    assert found.uris == (WEB,)
    assert found.dns == ("a.example", "b.example")
    assert found.cn == ("a.example",)
    assert found.subject == "CN=a.example,O=tlsproxy tests"
    assert found.spiffe_id() == WEB
    assert AllowList(uri=["spiffe://prod.example/ns/web/**"]).admits(found)


# ---------------------------------------------------------------- properties

# Fixed seed and budget: the same inputs every run, well under a second.
PROPERTIES = settings(derandomize=True, max_examples=200, deadline=None, database=None)

_TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
_SEGMENT_CHARS = _TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

trust_domains = st.text(_TD_CHARS, min_size=1, max_size=20)
segments = st.text(_SEGMENT_CHARS, min_size=1, max_size=12).filter(lambda s: s not in {".", ".."})


@st.composite
def spiffe_ids(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A valid SPIFFE ID and its trust domain followed by its path segments."""
    parts = [draw(trust_domains), *draw(st.lists(segments, max_size=6))]
    return "spiffe://" + "/".join(parts), parts


@PROPERTIES
@given(spiffe_ids())
def test_a_spiffe_id_is_admitted_by_itself_and_every_remainder_prefix(
    generated: tuple[str, list[str]],
) -> None:
    spiffe_id, parts = generated
    assert is_spiffe_id(spiffe_id)
    assert check_uri_pattern(spiffe_id) is None
    assert AllowList(uri=[spiffe_id]).admits(identity(spiffe_id))
    for cut in range(1, len(parts) + 1):
        prefix = "spiffe://" + "/".join([*parts[:cut], "**"])
        assert check_uri_pattern(prefix) is None
        assert AllowList(uri=[prefix]).admits(identity(spiffe_id)), prefix
    assert Identity(subject="", uris=(spiffe_id,)).spiffe_id() == spiffe_id


@PROPERTIES
@given(spiffe_ids(), trust_domains)
def test_no_pattern_of_another_trust_domain_admits(
    generated: tuple[str, list[str]], other: str
) -> None:
    spiffe_id, parts = generated
    assume(other != parts[0])
    patterns = [
        "spiffe://" + "/".join([other, *parts[1:]]),
        "spiffe://" + "/".join([other, "**"]),
        "spiffe://" + "/".join([other, *("*" for _ in parts[1:])]),
    ]
    assert not AllowList(uri=patterns).admits(identity(spiffe_id))


@PROPERTIES
@given(spiffe_ids(), st.data())
def test_a_star_stands_for_exactly_one_segment(
    generated: tuple[str, list[str]], data: st.DataObject
) -> None:
    spiffe_id, parts = generated
    assume(len(parts) > 1)
    index = data.draw(st.integers(1, len(parts) - 1))
    pattern = "spiffe://" + "/".join([*parts[:index], "*", *parts[index + 1 :]])
    assert AllowList(uri=[pattern]).admits(identity(spiffe_id))
    extra = data.draw(segments)
    longer = "spiffe://" + "/".join([*parts[:index], extra, *parts[index:]])
    assert not AllowList(uri=[pattern]).admits(identity(longer))


@PROPERTIES
@given(spiffe_ids(), spiffe_ids())
def test_two_spiffe_ids_are_admitted_by_no_uri_pattern(
    first: tuple[str, list[str]], second: tuple[str, list[str]]
) -> None:
    assume(first[0] != second[0])
    both = identity(first[0], second[0])
    assert not AllowList(uri=[first[0], second[0], "spiffe://" + first[1][0] + "/**"]).admits(both)
    assert both.spiffe_id() is None


@PROPERTIES
@given(st.text(max_size=80))
def test_check_uri_pattern_never_raises_and_what_it_accepts_compiles(pattern: str) -> None:
    problem = check_uri_pattern(pattern)
    if problem is None:
        AllowList(uri=[pattern])  # no ValueError, no re.error
    else:
        assert problem  # a reason, for the TOML path's message
        with pytest.raises(ValueError, match="invalid uri pattern"):
            AllowList(uri=[pattern])


@PROPERTIES
@given(st.text(max_size=40))
def test_an_arbitrary_uri_never_breaks_a_decision(uri: str) -> None:
    allow = AllowList(uri=["spiffe://prod.example/**", "https://id.example/*"])
    admitted = allow.admits(identity(uri))
    assert admitted == (
        (is_spiffe_id(uri) and (uri + "/").startswith("spiffe://prod.example/"))
        or (uri.startswith("https://id.example/") and "/" not in uri[19:] and len(uri) > 19)
    )


@PROPERTIES
@given(st.text(min_size=1, max_size=16), st.text(min_size=1, max_size=16))  # 64 bytes at most
def test_the_subject_is_spelled_as_cryptography_spells_rfc4514(cn: str, org: str) -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    rdns = ((("organizationName", org),), (("commonName", cn),))
    assert rfc4514(rdns) == name.rfc4514_string()
