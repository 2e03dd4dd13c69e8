"""Static checks of the deployment files (infra/*.bicep, azure.yaml, workflows, package script).

No Azure and no Bicep CLI here, so the .bicep files are read as TEXT with a small scanner that knows Bicep's
comments, strings ('…', '''…''') and ${…} interpolations. CI compiles them for real (.github/workflows/ci.yml,
job "bicep"). Each test targets one property and fails if that property is broken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from d365_migration._settings import APP_SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
APP = INFRA / "app"
WORKFLOWS = ROOT / ".github" / "workflows"

QUEUES = ("purchase-new", "reassign-licenses", "suspend-old", "scan-customers")
ROLE_IDS = {
    "storage blob data owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storage queue data contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "storage table data contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "monitoring metrics publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "key vault secrets officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
}
# Which resource (symbolic name in rbac.bicep, by type) each role must be scoped to.
ROLE_SCOPE_TYPES = {
    "storage blob data owner": "Microsoft.Storage/storageAccounts",
    "storage queue data contributor": "Microsoft.Storage/storageAccounts",
    "storage table data contributor": "Microsoft.Storage/storageAccounts",
    "monitoring metrics publisher": "Microsoft.Insights/components",
    "key vault secrets officer": "Microsoft.KeyVault/vaults",
}
# App settings the Bicep may set besides APP_SETTINGS and the AzureWebJobsStorage__* family.
PLATFORM_SETTINGS = frozenset({
    "AZURE_CLIENT_ID",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
})
STORAGE_FAMILY = ("credential", "clientId", "blobServiceUri", "queueServiceUri", "tableServiceUri")
# Classic settings that are deprecated/unsupported on Flex Consumption or imply storage keys.
FORBIDDEN_SETTINGS = frozenset({
    "AzureWebJobsStorage",
    "FUNCTIONS_WORKER_RUNTIME",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_TIME_ZONE",
    "APPINSIGHTS_INSTRUMENTATIONKEY",
})
# Deployed defaults, app setting -> (value the app setting resolves to by default, Settings attribute or None).
EXPECTED_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "DRY_RUN": ("true", None),
    "PARTNER_CENTER_AUTH": ("app-user", "auth"),
    "PARTNER_CENTER_ENDPOINT": ("https://api.partnercenter.microsoft.com", "endpoint"),
    "PARTNER_CENTER_AUTHORITY": ("https://login.microsoftonline.com", "authority"),
    "REPLACEMENT_OFFERS": ("{}", None),
    "DETECT_SCHEDULE": ("0 0 6 * * *", "detect_schedule"),
    "EXPIRY_WINDOW_DAYS": ("60", "expiry_window_days"),
    "LEDGER_TABLE": ("migrations", "ledger_table"),
    "PROVISIONING_POLL_SECONDS": ("60", "provisioning_poll_seconds"),
    "PROVISIONING_TIMEOUT_MINUTES": ("1440", "provisioning_timeout_minutes"),
    "PARTNER_CENTER_REQUESTS_PER_MINUTE": ("500", "requests_per_minute"),
    "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": ("300", "license_requests_per_minute"),
    "PARTNER_CENTER_MAX_CONCURRENCY": ("16", "max_concurrency"),
    "PARTNER_CENTER_BUDGET_TABLE": ("partnercenterbudget", "budget_table"),
    "PARTNER_CENTER_BUDGET_BLOCK_SECONDS": ("1.0", "budget_block_seconds"),
    "PARTNER_CENTER_FALLBACK_SHARE": ("0.1", "fallback_share"),
    "MAX_PURCHASES_PER_RUN": ("50", "max_purchases_per_run"),
    "CUSTOMER_ALLOWLIST": ("", None),
    "CUSTOMER_DENYLIST": ("", None),
    "INVOCATION_BUDGET_SECONDS": ("480", "invocation_budget_seconds"),
    "REPLACEMENT_BILLING_CYCLE": ("monthly", "replacement_billing_cycle"),
    "REPLACEMENT_TERM_DURATION": ("P1Y", "replacement_term_duration"),
    "REPLACEMENT_QUANTITY_POLICY": ("old_quantity", "replacement_quantity_policy"),
    "RETIRED_OFFERS_EXTRA": ("", None),
    "PARTNER_CENTER_TENANT_ID": ("", None),
    "PARTNER_CENTER_CLIENT_ID": ("", None),
}
ALERT_EVENTS = ("message_poisoned", "record_failed", "refresh_token_expiring", "auth_failed", "needs_attention")
FUNCTION_FOLDERS = ("detect_expiring", "purchase_new", "reassign_licenses", "suspend_old", "scan_customers", "status")


# ---------------------------------------------------------------------------------------------------------------
# A small Bicep text scanner


class BicepSyntaxError(ValueError):
    pass


def scan(text: str) -> tuple[str, str]:
    """Return ``(skeleton, code)`` for Bicep ``text``; both have the same length as ``text``, newlines kept.

    ``code`` is ``text`` with comments blanked out (strings intact). ``skeleton`` additionally blanks string
    contents, keeping the quote characters and the code inside ``${…}`` interpolations (whose nested strings are
    blanked too), so brackets in it are real brackets. Raises :class:`BicepSyntaxError` on an unterminated string,
    comment or interpolation.
    """
    skel = list(text)
    code = list(text)
    n = len(text)
    interp: list[int] = []  # `{` depth inside each open ${…}

    def blank(target: list[str], a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if target[k] != "\n":
                target[k] = " "

    def scan_string(start: int) -> int:
        """``start`` is at the opening quote of a '…' string; return the index after its closing quote."""
        j = start + 1
        while j < n:
            c = text[j]
            if c == "\\":
                blank(skel, j, j + 2)
                j += 2
                continue
            if c == "'":
                return j + 1
            if c == "\n":
                raise BicepSyntaxError(f"unterminated string at offset {start}")
            if text.startswith("${", j):
                blank(skel, j, j + 2)
                interp.append(0)
                j = scan_code(j + 2, inside_interpolation=True)
                continue
            skel[j] = " "
            j += 1
        raise BicepSyntaxError(f"unterminated string at offset {start}")

    def scan_code(j: int, *, inside_interpolation: bool) -> int:
        while j < n:
            if text.startswith("'''", j):
                end = text.find("'''", j + 3)
                if end < 0:
                    raise BicepSyntaxError(f"unterminated multi-line string at offset {j}")
                blank(skel, j + 3, end)
                j = end + 3
                continue
            if text.startswith("//", j):
                end = text.find("\n", j)
                end = n if end < 0 else end
                blank(skel, j, end)
                blank(code, j, end)
                j = end
                continue
            if text.startswith("/*", j):
                end = text.find("*/", j + 2)
                if end < 0:
                    raise BicepSyntaxError(f"unterminated block comment at offset {j}")
                blank(skel, j, end + 2)
                blank(code, j, end + 2)
                j = end + 2
                continue
            c = text[j]
            if c == "'":
                j = scan_string(j)
                continue
            if inside_interpolation:
                if c == "{":
                    interp[-1] += 1
                elif c == "}":
                    if interp[-1] == 0:
                        interp.pop()
                        skel[j] = " "
                        return j + 1
                    interp[-1] -= 1
            j += 1
        if inside_interpolation:
            raise BicepSyntaxError("unterminated ${ interpolation")
        return j

    scan_code(0, inside_interpolation=False)
    return "".join(skel), "".join(code)


def skeleton(text: str) -> str:
    return scan(text)[0]


def check_balanced(text: str) -> None:
    skel = skeleton(text)
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int]] = []
    for k, c in enumerate(skel):
        if c in "([{":
            stack.append((c, k))
        elif c in ")]}":
            if not stack or stack[-1][0] != pairs[c]:
                line = text.count("\n", 0, k) + 1
                raise BicepSyntaxError(f"unbalanced {c!r} on line {line}")
            stack.pop()
    if stack:
        c, k = stack[-1]
        raise BicepSyntaxError(f"unclosed {c!r} from line {text.count(chr(10), 0, k) + 1}")


def matching_close(skel: str, open_at: int) -> int:
    """Index of the bracket closing the one at ``open_at`` (in skeleton coordinates)."""
    opener = skel[open_at]
    closer = {"{": "}", "[": "]", "(": ")"}[opener]
    depth = 0
    for k in range(open_at, len(skel)):
        if skel[k] == opener:
            depth += 1
        elif skel[k] == closer:
            depth -= 1
            if depth == 0:
                return k
    raise BicepSyntaxError(f"no closing {closer!r} for offset {open_at}")


@dataclass(frozen=True)
class Block:
    """The text between a pair of braces, with helpers to read its top-level ``key: value`` entries."""

    text: str  # the code (comments blanked), braces excluded
    skel: str  # skeleton of the same span

    def entries(self) -> dict[str, str]:
        """Top-level entries, key -> raw value text (multi-line values kept whole, comments removed)."""
        result: dict[str, str] = {}
        depth = 0
        k = 0
        n = len(self.skel)
        while k < n:
            line_end = self.skel.find("\n", k)
            line_end = n if line_end < 0 else line_end
            line_skel = self.skel[k:line_end]
            if depth == 0:
                m = re.match(r"\s*('[^']*'|[A-Za-z_$][\w$]*)\s*:", self.text[k:line_end])
                if m and re.match(r"\s*('\s*'|[A-Za-z_$][\w$]*)\s*:", line_skel):
                    key = m.group(1).strip("'")
                    value_start = k + m.end()
                    # The value runs to the first newline outside brackets (multi-line objects, arrays, calls).
                    end = value_start
                    level = 0
                    while end < n and not (self.skel[end] == "\n" and level == 0):
                        if self.skel[end] in "{[(":
                            level += 1
                        elif self.skel[end] in "}])":
                            level -= 1
                        end += 1
                    result[key] = re.sub(r"[ \t]+\n", "\n", self.text[value_start:end]).strip()
                    k = end + 1
                    continue
            for c in line_skel:
                if c in "{[(":
                    depth += 1
                elif c in "}])":
                    depth -= 1
            k = line_end + 1
        return result

    def block(self, key: str) -> Block:
        """The object value of top-level ``key`` (``key: {…}``)."""
        value = self.entries().get(key)
        if value is None or not value.startswith("{"):
            raise KeyError(f"no object {key!r} in block")
        return parse_block(value, 0)


def parse_block(text: str, open_at: int) -> Block:
    skel, code = scan(text)
    if skel[open_at] != "{":
        raise BicepSyntaxError(f"expected '{{' at offset {open_at}")
    close = matching_close(skel, open_at)
    return Block(code[open_at + 1:close], skel[open_at + 1:close])


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str  # e.g. Microsoft.Web/sites (API version stripped)
    existing: bool
    condition: str | None
    loop: str | None
    body: Block


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None


class BicepFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.skel, self.code = scan(self.text)  # code: comments blanked, strings intact

    def _decls(self, keyword: str) -> list[re.Match[str]]:
        return list(re.finditer(rf"^{keyword}\s+(\w+)\s+'([^']*)'\s*(existing\s*)?=\s*", self.code, re.MULTILINE))

    def resources(self, type_prefix: str | None = None) -> list[Resource]:
        found = []
        for m in self._decls("resource"):
            rtype = m.group(2).split("@", 1)[0]
            if type_prefix and rtype.lower() != type_prefix.lower():
                continue
            condition, loop, brace = self._body_start(m.end())
            found.append(Resource(m.group(1), rtype, bool(m.group(3)), condition, loop, parse_block(self.text, brace)))
        return found

    def resource(self, type_name: str, *, existing: bool = False) -> Resource:
        matches = [r for r in self.resources(type_name) if r.existing == existing]
        assert len(matches) == 1, f"{self.path.name}: expected one {type_name} resource, found {len(matches)}"
        return matches[0]

    def modules(self) -> list[tuple[str, str, str | None, Block]]:
        found = []
        for m in self._decls("module"):
            condition, _loop, brace = self._body_start(m.end())
            found.append((m.group(1), m.group(2), condition, parse_block(self.text, brace)))
        return found

    def module(self, symbol: str) -> Block:
        for name, _path, _cond, body in self.modules():
            if name == symbol:
                return body
        raise KeyError(f"{self.path.name}: no module {symbol!r}")

    def _body_start(self, pos: int) -> tuple[str | None, str | None, int]:
        """After ``= ``: optional ``if (cond)`` / ``[for … :``; return (condition, loop, index of the body's '{')."""
        rest = self.skel[pos:]
        condition = loop = None
        m = re.match(r"\s*if\s*\(", rest)
        if m:
            open_paren = pos + m.end() - 1
            close = matching_close(self.skel, open_paren)
            condition = self.text[open_paren + 1:close].strip()
            pos = close + 1
            rest = self.skel[pos:]
        m = re.match(r"\s*\[\s*for\s+([^:]+):\s*", rest)
        if m:
            loop = re.sub(r"^\[\s*", "[", " ".join(self.code[pos:pos + m.end()].split()))
            pos += m.end()
            rest = self.skel[pos:]
            m2 = re.match(r"\s*if\s*\(", rest)
            if m2:
                open_paren = pos + m2.end() - 1
                close = matching_close(self.skel, open_paren)
                condition = self.text[open_paren + 1:close].strip()
                pos = close + 1
        brace = self.skel.find("{", pos)
        if brace < 0 or self.skel[pos:brace].strip():
            raise BicepSyntaxError(f"{self.path.name}: no body at offset {pos}")
        return condition, loop, brace

    def params(self) -> dict[str, Param]:
        result = {}
        for m in re.finditer(r"^param\s+(\w+)\s+(\w+)(?:[ \t]*=[ \t]*(.+))?$", self.code, re.MULTILINE):
            default = m.group(3).strip() if m.group(3) is not None else None
            result[m.group(1)] = Param(m.group(1), m.group(2), default)
        return result

    def variables(self) -> dict[str, str]:
        result = {}
        for m in re.finditer(r"^var\s+(\w+)\s*=\s*", self.code, re.MULTILINE):
            start = m.end()
            if self.skel[start] in "[{(":
                end = matching_close(self.skel, start) + 1
            else:
                end = self.skel.find("\n", start)
                end = len(self.skel) if end < 0 else end
            result[m.group(1)] = self.code[start:end].strip()
        return result

    def outputs(self) -> dict[str, str]:
        return {m.group(1): m.group(3).strip() for m in
                re.finditer(r"^output\s+(\w+)\s+(\w+)\s*=\s*(.+)$", self.code, re.MULTILINE)}


@cache
def bicep(name: str) -> BicepFile:
    return BicepFile(INFRA / name)


def literal(value: str) -> str:
    """The Python value of a simple Bicep literal: 'string' (no interpolation), number or bool."""
    value = value.strip()
    m = re.fullmatch(r"'((?:[^'\\$]|\\.|\$(?!\{))*)'", value)
    if m:
        return re.sub(r"\\(.)", r"\1", m.group(1))
    if re.fullmatch(r"-?\d+|true|false", value):
        return value
    raise ValueError(f"not a simple literal: {value!r}")


def value_in(file: BicepFile, expr: str) -> str:
    """A literal, or the literal default of a parameter of ``file``."""
    params = file.params()
    if expr in params:
        default = params[expr].default
        assert default is not None, f"{file.path.name}: param {expr} has no default"
        return literal(default)
    return literal(expr)


def all_bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


# ---------------------------------------------------------------------------------------------------------------
# Reading the function app and its settings


def api() -> BicepFile:
    return bicep("app/api.bicep")


def app_settings() -> dict[str, str]:
    res = [r for r in api().resources("Microsoft.Web/sites/config")
           if literal(r.body.entries()["name"]) == "appsettings"]
    assert len(res) == 1, "api.bicep must declare exactly one sites/config 'appsettings' resource"
    return res[0].body.block("properties").entries()


def site() -> Resource:
    return api().resource("Microsoft.Web/sites")


def resolve_default(setting: str) -> str:
    """The value an app setting gets with all template defaults, following api.bicep params to main.bicep."""
    expr = app_settings()[setting]
    try:
        return literal(expr)
    except ValueError:
        pass
    api_module = bicep("main.bicep").module("api").block("params").entries()
    main_params = bicep("main.bicep").params()
    api_params = api().params()

    def value_of_api_param(name: str) -> str:
        if name in api_module:
            passed = api_module[name]
            if passed in main_params:
                default = main_params[passed].default
                assert default is not None, f"main.bicep param {passed} (for {setting}) has no default"
                return literal(default)
            return literal(passed)
        default = api_params[name].default
        assert default is not None, f"api.bicep param {name} is neither passed by main.bicep nor defaulted"
        return literal(default)

    m = re.fullmatch(r"string\((\w+)\)", expr) or re.fullmatch(r"(\w+)", expr)
    if m and m.group(1) in api_params:
        return value_of_api_param(m.group(1))
    m = re.fullmatch(r"(\w+)\s*\?\s*'([^']*)'\s*:\s*'([^']*)'", expr)
    if m and m.group(1) in api_params:
        return m.group(2) if value_of_api_param(m.group(1)) == "true" else m.group(3)
    raise AssertionError(f"cannot resolve the default of {setting} = {expr}")


# ---------------------------------------------------------------------------------------------------------------
# The scanner itself (so a broken helper cannot make the real tests vacuous)


def test_scanner_handles_strings_comments_and_interpolation() -> None:
    src = "var a = '${x ? '}' : '{'}' // } ]\n/* { */ var b = { c: '''\n{ ''' }\n"
    check_balanced(src)
    with pytest.raises(BicepSyntaxError):
        check_balanced(src + "var d = [\n")
    with pytest.raises(BicepSyntaxError):
        skeleton("var a = 'oops\n")
    blk = parse_block("x = {\n  a: 'x: y' // c: 1\n  b: {\n    c: 2\n  }\n  'd-e': [\n    1\n  ]\n}", 4)
    assert blk.entries() == {"a": "'x: y'", "b": "{\n    c: 2\n  }", "d-e": "[\n    1\n  ]"}
    assert blk.block("b").entries() == {"c": "2"}
    assert literal("'it\\'s'") == "it's"
    with pytest.raises(ValueError):
        literal("'${x}'")


# ---------------------------------------------------------------------------------------------------------------
# Files and structure


def test_every_bicep_file_is_balanced() -> None:
    files = all_bicep_files()
    assert MAIN in files and len(files) >= 7
    for path in files:
        try:
            check_balanced(path.read_text(encoding="utf-8"))
        except BicepSyntaxError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {exc}")


def test_every_bicep_file_parses_with_the_tree_sitter_grammar() -> None:
    """A second, independent syntax check; runs where tree-sitter-bicep is installed (optional dev extra)."""
    tsb = pytest.importorskip("tree_sitter_bicep")
    tree_sitter = pytest.importorskip("tree_sitter")
    parser = tree_sitter.Parser(tree_sitter.Language(tsb.language()))
    for path in all_bicep_files():
        tree = parser.parse(path.read_bytes())
        assert not tree.root_node.has_error, f"{path.relative_to(ROOT)} has a syntax error"


def test_main_targets_subscription_and_creates_the_resource_group() -> None:
    main = bicep("main.bicep")
    assert re.search(r"^targetScope\s*=\s*'subscription'\s*$", main.code, re.MULTILINE)
    assert main.resources("Microsoft.Resources/resourceGroups")


def test_every_referenced_module_exists_and_none_comes_from_a_registry() -> None:
    modules_seen = 0
    for path in all_bicep_files():
        for name, ref, _cond, _body in BicepFile(path).modules():
            assert not ref.startswith("br:") and not ref.startswith("br/"), \
                f"{path.name}: module {name} uses registry module {ref}; the compiled template must be self-contained"
            assert (path.parent / ref).is_file(), f"{path.name}: module {name} references missing {ref}"
            modules_seen += 1
    assert modules_seen >= 7


def test_main_parameters_json_is_valid_and_matches_main_bicep() -> None:
    data = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    params = data["parameters"]
    declared = bicep("main.bicep").params()
    unknown = set(params) - set(declared)
    assert not unknown, f"main.parameters.json sets parameters main.bicep does not declare: {sorted(unknown)}"
    required = {name for name, p in declared.items() if p.default is None}
    missing = required - set(params)
    assert not missing, f"required main.bicep parameters missing from main.parameters.json: {sorted(missing)}"
    assert params["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert params["location"]["value"] == "${AZURE_LOCATION}"


def test_abbreviations_json_is_valid() -> None:
    abbrs = json.loads((INFRA / "abbreviations.json").read_text(encoding="utf-8"))
    for key in re.findall(r"abbrs\.(\w+)", bicep("main.bicep").code):
        assert key in abbrs, f"main.bicep uses abbrs.{key}, missing from abbreviations.json"


def test_main_outputs_for_azd() -> None:
    outputs = bicep("main.bicep").outputs()
    for name in ("AZURE_FUNCTION_APP_NAME", "AZURE_KEY_VAULT_NAME", "AZURE_KEY_VAULT_URI", "RESOURCE_GROUP",
                 "AZURE_LOCATION", "AZURE_TENANT_ID"):
        assert name in outputs, f"main.bicep must output {name}"
    assert outputs["AZURE_KEY_VAULT_URI"] == "keyVault.outputs.uri"
    assert outputs["AZURE_FUNCTION_APP_NAME"] == "api.outputs.name"


# ---------------------------------------------------------------------------------------------------------------
# App settings


def test_every_setting_the_code_reads_is_set() -> None:
    settings = app_settings()
    missing = []
    for name in APP_SETTINGS:
        if name == "AzureWebJobsStorage":
            # Satisfied by the identity-based family (the plain connection string must not be set).
            family = [f"AzureWebJobsStorage__{part}" for part in STORAGE_FAMILY]
            missing += [f for f in family if f not in settings]
        elif name not in settings:
            missing.append(name)
    assert not missing, f"app settings missing from infra/app/api.bicep: {missing}"


def test_no_unknown_app_settings() -> None:
    unknown = [name for name in app_settings()
               if name not in APP_SETTINGS and name not in PLATFORM_SETTINGS
               and not name.startswith("AzureWebJobsStorage__")]
    assert not unknown, f"settings neither in APP_SETTINGS nor known platform settings (typo?): {unknown}"


def test_no_key_based_or_flex_deprecated_settings() -> None:
    present = FORBIDDEN_SETTINGS & set(app_settings())
    assert not present, f"must not be set on Flex Consumption with keyless storage: {sorted(present)}"


def test_host_storage_uses_the_user_assigned_identity() -> None:
    settings = app_settings()
    assert literal(settings["AzureWebJobsStorage__credential"]) == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"
    for part, endpoint in (("blob", "storageBlobEndpoint"), ("queue", "storageQueueEndpoint"),
                           ("table", "storageTableEndpoint")):
        assert settings[f"AzureWebJobsStorage__{part}ServiceUri"] == endpoint
    # ...and those params come from the identity and storage modules in main.bicep.
    passed = bicep("main.bicep").module("api").block("params").entries()
    assert passed["identityClientId"] == "identity.outputs.clientId"
    assert passed["identityId"] == "identity.outputs.id"
    assert passed["storageQueueEndpoint"] == "storage.outputs.queueEndpoint"
    ident = bicep("app/identity.bicep")
    ident.resource("Microsoft.ManagedIdentity/userAssignedIdentities")
    assert ident.outputs()["clientId"] == "identity.properties.clientId"


def test_application_insights_uses_entra_ingestion() -> None:
    settings = app_settings()
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "'ClientId=${identityClientId};Authorization=AAD'"
    assert settings["APPLICATIONINSIGHTS_CONNECTION_STRING"] == "appInsightsConnectionString"


def test_secrets_are_key_vault_references_only() -> None:
    settings = app_settings()
    expected = {
        "PARTNER_CENTER_CLIENT_SECRET": "partner-center-client-secret",
        "PARTNER_CENTER_REFRESH_TOKEN": "partner-center-refresh-token",
    }
    for name, secret in expected.items():
        assert settings[name] == f"'@Microsoft.KeyVault(SecretUri=${{keyVaultUri}}secrets/{secret}/)'", name
    # Anything else that looks secret must be a Key Vault reference too.
    for name, value in settings.items():
        if re.search(r"SECRET|TOKEN|PASSWORD|(?<!VAULT_)KEY(?!_VAULT)", name) and name not in expected:
            assert value.startswith("'@Microsoft.KeyVault("), f"{name} looks secret but is not a Key Vault reference"
    assert settings["KEY_VAULT_URL"] == "keyVaultUri"
    assert bicep("main.bicep").module("api").block("params").entries()["keyVaultUri"] == "keyVault.outputs.uri"
    assert bicep("app/keyvault.bicep").outputs()["uri"] == "vault.properties.vaultUri"
    # The template never stores secret values.
    for path in all_bicep_files():
        assert not BicepFile(path).resources("Microsoft.KeyVault/vaults/secrets"), f"{path.name} creates a secret"


def test_no_storage_keys_anywhere_in_infra() -> None:
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8").lower()
        for needle in ("accountkey=", "listkeys(", "listkeys'", "primarykey", "sharedaccesssignature"):
            assert needle not in text, f"{path.relative_to(ROOT)} contains {needle!r}"


def test_dry_run_defaults_to_true() -> None:
    # DRY_RUN is no longer a deployment parameter at all (issue 11): the deployed value is the literal 'true', the
    # first-deploy default of the rollout controls, and no azd env value or template parameter can change it.
    assert literal(app_settings()["DRY_RUN"]) == "true"
    assert "dryRun" not in bicep("main.bicep").params() and "dryRun" not in api().params()
    assert resolve_default("DRY_RUN") == "true"
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert "dryRun" not in params


ROLLOUT_SETTINGS = ("DRY_RUN", "CUSTOMER_ALLOWLIST", "MAX_PURCHASES_PER_RUN")


def test_deployment_carries_no_rollout_state_a_redeploy_could_reset() -> None:
    """The rollout controls live in storage. The template sets their app settings to fixed safe literals (never a
    parameter, so `azd up` with any azd environment deploys the same values), and main.parameters.json maps no azd
    environment value onto them."""
    settings = app_settings()
    api_params = set(api().params())
    for name in ROLLOUT_SETTINGS:
        expr = settings[name]
        value = literal(expr)  # raises if the value is an expression (a parameter, a variable, a function call)
        assert not any(re.search(rf"\b{re.escape(p)}\b", expr) for p in api_params), f"{name} = {expr}"
        assert value == {"DRY_RUN": "true", "CUSTOMER_ALLOWLIST": "", "MAX_PURCHASES_PER_RUN": "50"}[name]
    raw = (INFRA / "main.parameters.json").read_text(encoding="utf-8")
    for name in ROLLOUT_SETTINGS:
        assert "${" + name not in raw, f"main.parameters.json maps the azd env value {name}"
    for param in ("dryRun", "customerAllowlist", "maxPurchasesPerRun"):
        assert param not in bicep("main.bicep").params(), f"main.bicep still has a {param} parameter"
        assert param not in api_params, f"api.bicep still has a {param} parameter"
    assert "DRY_RUN" not in bicep("main.bicep").outputs()  # nothing feeds a rollout value back into the azd env


def test_deployed_settings_seed_a_dry_run_for_nobody() -> None:
    from d365_migration._rollout import controls_from_settings
    from d365_migration._settings import load_settings

    deployed = {name: literal(app_settings()[name]) for name in ROLLOUT_SETTINGS}
    controls = controls_from_settings(load_settings(deployed))
    assert controls.dry_run and not controls.may_purchase
    assert not controls.all_customers and controls.allowlist == frozenset()
    assert controls.max_purchases_per_run == 50


def test_a_redeploy_cannot_clear_or_widen_stored_rollout_controls(storage: str) -> None:
    """Go live for one customer with a brake of 2, then 're-deploy': the app now reads the deployed app settings.
    The stored controls stay exactly as they were."""
    import asyncio

    from d365_migration._ledger import MigrationLedger
    from d365_migration._rollout import (
        RolloutControls,
        RolloutStore,
        controls_from_settings,
        load_effective_controls,
    )
    from d365_migration._settings import load_settings

    customer = "11111111-2222-3333-4444-555555555555"
    deployed = {name: literal(app_settings()[name]) for name in ROLLOUT_SETTINGS}
    store = RolloutStore(MigrationLedger.from_connection_string(storage).table_client)

    async def scenario() -> tuple[RolloutControls, RolloutControls]:
        before = await store.change(
            lambda c: type(c)(**{**c.__dict__, "live": True, "allowlist": frozenset({customer}),
                                 "max_purchases_per_run": 2}),
            by="operator", action="set", reason=None, defaults=controls_from_settings(load_settings(deployed)))
        after = await load_effective_controls(store, load_settings({**deployed, "AzureWebJobsStorage": storage}))
        return before, after

    before, after = asyncio.run(scenario())
    assert after == before
    assert after.live and after.allowlist == frozenset({customer}) and after.max_purchases_per_run == 2
    assert not after.all_customers


@pytest.mark.parametrize("setting", sorted(EXPECTED_DEFAULTS))
def test_setting_defaults(setting: str) -> None:
    expected, attribute = EXPECTED_DEFAULTS[setting]
    assert resolve_default(setting) == expected
    if attribute is not None:  # the deployed default agrees with the code's own default
        assert str(getattr(Settings(), attribute)) == expected


def test_detect_schedule_default_is_a_six_field_ncrontab() -> None:
    assert len(resolve_default("DETECT_SCHEDULE").split()) == 6


# ---------------------------------------------------------------------------------------------------------------
# Function app and plan


def test_flex_consumption_plan() -> None:
    plan = api().resource("Microsoft.Web/serverfarms").body
    sku = plan.block("sku").entries()
    assert literal(sku["name"]) == "FC1"
    assert literal(sku["tier"]) == "FlexConsumption"
    assert literal(plan.block("properties").entries()["reserved"]) == "true"


def test_function_app_runtime_identity_and_hardening() -> None:
    body = site().body
    assert literal(body.entries()["kind"]) == "functionapp,linux"
    identity = body.block("identity").entries()
    assert literal(identity["type"]) == "UserAssigned"
    assert "identityId" in identity["userAssignedIdentities"]
    props = body.block("properties")
    entries = props.entries()
    assert literal(entries["httpsOnly"]) == "true"
    assert entries["keyVaultReferenceIdentity"] == "identityId"
    site_config = props.block("siteConfig").entries()
    assert literal(site_config["minTlsVersion"]) == "1.2"
    assert literal(site_config["ftpsState"]) == "Disabled"
    fac = props.block("functionAppConfig")
    runtime = fac.block("runtime").entries()
    assert literal(runtime["name"]) == "python"
    assert value_in(api(), runtime["version"]) == "3.13"


def test_deployment_storage_uses_the_user_assigned_identity() -> None:
    storage = site().body.block("properties").block("functionAppConfig").block("deployment").block("storage")
    assert literal(storage.entries()["type"]) == "blobContainer"
    auth = storage.block("authentication").entries()
    assert literal(auth["type"]) == "UserAssignedIdentity"
    assert auth["userAssignedIdentityResourceId"] == "identityId"


def test_scale_out_is_capped_by_a_small_parameter() -> None:
    scale = site().body.block("properties").block("functionAppConfig").block("scaleAndConcurrency").entries()
    assert value_in(api(), scale["instanceMemoryMB"]) == "2048"
    assert scale["maximumInstanceCount"] == "maximumInstanceCount", "must be a parameter, not a literal"
    assert bicep("main.bicep").module("api").block("params").entries()["maximumInstanceCount"] == "maximumInstanceCount"
    default = bicep("main.bicep").params()["maximumInstanceCount"].default
    assert default is not None and 1 <= int(literal(default)) <= 10, \
        "Partner Center rate limits are per partner tenant: keep the default scale-out small"


def test_onedeploy_package_option() -> None:
    main = bicep("main.bicep")
    assert main.params()["packageUri"] == Param("packageUri", "string", "''")
    [(_name, _ref, condition, body)] = [m for m in main.modules() if m[1] == "app/deploy.bicep"]
    assert condition == "!empty(packageUri)"
    assert body.block("params").entries()["packageUri"] == "packageUri"
    ext = bicep("app/deploy.bicep").resource("Microsoft.Web/sites/extensions").body
    assert literal(ext.entries()["name"]) == "onedeploy"
    props = ext.block("properties").entries()
    assert props["packageUri"] == "packageUri"
    assert literal(props["remoteBuild"]) == "false"


# ---------------------------------------------------------------------------------------------------------------
# Storage


def storage_account() -> Resource:
    return bicep("app/storage.bicep").resource("Microsoft.Storage/storageAccounts")


def test_storage_account_is_keyless_and_private() -> None:
    props = storage_account().body.block("properties").entries()
    assert literal(props["allowSharedKeyAccess"]) == "false"
    assert literal(props["allowBlobPublicAccess"]) == "false"
    assert literal(props["minimumTlsVersion"]) == "TLS1_2"
    assert literal(props["supportsHttpsTrafficOnly"]) == "true"


def declared_queue_names() -> set[str]:
    storage = bicep("app/storage.bicep")
    variables = storage.variables()
    names: set[str] = set()
    lists: dict[str, list[str]] = {}
    for var, expr in variables.items():
        if expr.startswith("[") and not expr.startswith("[for"):
            lists[var] = re.findall(r"'([^'$]*)'", expr)
    for var, expr in variables.items():
        m = re.fullmatch(r"\[for (\w+) in (\w+): '\$\{\1\}-poison'\]", expr)
        if m and m.group(2) in lists:
            lists[var] = [f"{q}-poison" for q in lists[m.group(2)]]
    for res in storage.resources("Microsoft.Storage/storageAccounts/queueServices/queues"):
        name = res.body.entries()["name"]
        if res.loop:
            m = re.fullmatch(r"\[for (\w+) in (.+?):", res.loop)
            assert m and name == m.group(1), f"queue loop {res.loop!r} must name each queue after the loop variable"
            sources = re.findall(r"\w+", m.group(2))
            for src in sources:
                names.update(lists.get(src, []))
        else:
            names.add(literal(name))
    return names


def test_all_queues_and_poison_queues_are_declared() -> None:
    names = declared_queue_names()
    for queue in QUEUES:
        assert queue in names, f"queue {queue} not declared"
        assert f"{queue}-poison" in names, f"poison queue {queue}-poison not declared"
        assert len(f"{queue}-poison") <= 63


def test_queues_used_by_the_code_and_bindings_are_declared() -> None:
    from d365_migration._messages import QUEUE_FOR_STEP

    names = declared_queue_names()
    used = set(QUEUE_FOR_STEP.values())
    for folder in FUNCTION_FOLDERS:
        fj = ROOT / folder / "function.json"
        if fj.is_file():
            for binding in json.loads(fj.read_text(encoding="utf-8")).get("bindings", []):
                queue = binding.get("queueName")
                if queue and "%" not in queue:
                    used.add(queue)
    assert used - names == set(), f"queues used but not declared in storage.bicep: {sorted(used - names)}"


def _declared_tables() -> dict[str, str]:
    """storage.bicep's tables: default table name -> the main.bicep parameter it comes from."""
    storage = bicep("app/storage.bicep")
    passed = bicep("main.bicep").module("storage").block("params").entries()
    tables = {}
    for table in storage.resources("Microsoft.Storage/storageAccounts/tableServices/tables"):
        name = table.body.entries()["name"]
        assert name in storage.params(), "table names must be parameters passed by main.bicep"
        main_param = passed.get(name, "")
        assert main_param in bicep("main.bicep").params(), f"main.bicep must pass {name} to storage.bicep"
        tables[literal(bicep("main.bicep").params()[main_param].default or "")] = main_param
    return tables


def test_ledger_table_is_declared() -> None:
    tables = _declared_tables()
    assert tables.get("migrations") == "ledgerTableName", "main.bicep must pass its ledgerTableName to storage.bicep"
    assert app_settings()["LEDGER_TABLE"] == "ledgerTableName"
    assert bicep("main.bicep").module("api").block("params").entries()["ledgerTableName"] == "ledgerTableName"


def test_shared_request_budget_table_is_declared_and_not_derived_from_the_scale_out_cap() -> None:
    tables = _declared_tables()
    assert tables.get("partnercenterbudget") == "partnerCenterBudgetTableName"
    assert app_settings()["PARTNER_CENTER_BUDGET_TABLE"] == "partnerCenterBudgetTableName"
    assert (bicep("main.bicep").module("api").block("params").entries()["partnerCenterBudgetTableName"]
            == "partnerCenterBudgetTableName")
    # The budget is the tenant's, shared through the table: no app setting may be computed from the instance cap.
    derived = {k: v for k, v in app_settings().items() if "maximumInstanceCount" in v}
    assert derived == {}, f"app settings derived from the scale-out cap: {derived}"
    assert "PARTNER_CENTER_INSTANCES" not in app_settings()


def test_deployment_container_is_declared() -> None:
    storage = bicep("app/storage.bicep")
    [container] = storage.resources("Microsoft.Storage/storageAccounts/blobServices/containers")
    assert literal(container.body.block("properties").entries()["publicAccess"]) == "None"
    assert storage.outputs()["deploymentContainerName"] == "deploymentContainer.name"


# ---------------------------------------------------------------------------------------------------------------
# RBAC, Key Vault, monitoring, alerts


def test_role_assignments() -> None:
    rbac = bicep("app/rbac.bicep")
    variables = rbac.variables()
    by_id = {literal(v): k for k, v in variables.items() if re.fullmatch(r"'[0-9a-f-]{36}'", v)}
    scopes = {r.symbol: r.type for r in rbac.resources() if r.existing}
    assignments = rbac.resources("Microsoft.Authorization/roleAssignments")
    for role, role_id in ROLE_IDS.items():
        assert role_id in by_id, f"{role} ({role_id}) not declared in rbac.bicep"
        var = by_id[role_id]
        app_assignments = []
        for res in assignments:
            entries = res.body.entries()
            props = res.body.block("properties").entries()
            if var not in props["roleDefinitionId"] or props["principalId"] != "identityPrincipalId":
                continue
            app_assignments.append(res)
            assert entries["name"] == f"guid({entries['scope']}.id, identityPrincipalId, {var})", res.symbol
            assert literal(props["principalType"]) == "ServicePrincipal"
            assert props["roleDefinitionId"] == \
                f"subscriptionResourceId('Microsoft.Authorization/roleDefinitions', {var})"
            assert scopes.get(entries["scope"]) == ROLE_SCOPE_TYPES[role], f"{role} scoped to {entries['scope']}"
            assert res.condition is None, f"{role} for the app identity must be unconditional"
        assert len(app_assignments) == 1, f"{role}: expected one assignment for the app identity"
    passed = bicep("main.bicep").module("rbac").block("params").entries()
    assert passed["identityPrincipalId"] == "identity.outputs.principalId"


def test_key_vault_is_rbac_only_with_purge_protection() -> None:
    vault = bicep("app/keyvault.bicep").resource("Microsoft.KeyVault/vaults").body.block("properties")
    props = vault.entries()
    assert literal(props["enableRbacAuthorization"]) == "true"
    assert literal(props["enableSoftDelete"]) == "true"
    assert literal(props["enablePurgeProtection"]) == "true"
    assert props.get("accessPolicies", "[]").replace(" ", "") == "[]"


def test_application_insights_disables_local_auth() -> None:
    monitoring = bicep("app/monitoring.bicep")
    props = monitoring.resource("Microsoft.Insights/components").body.block("properties").entries()
    # ARM property names are case-insensitive; the 2020-02-02 schema spells it DisableLocalAuth.
    lowered = {k.lower(): v for k, v in props.items()}
    assert literal(lowered["disablelocalauth"]) == "true"
    assert lowered["workspaceresourceid"] == "logAnalytics.id"
    monitoring.resource("Microsoft.OperationalInsights/workspaces")


def test_alerts_on_the_logged_event_markers() -> None:
    alerts = bicep("app/alerts.bicep")
    [rules] = alerts.resources("Microsoft.Insights/scheduledQueryRules")
    definitions = alerts.variables()["alertDefinitions"]
    queries = re.findall(r"query:\s*'([^']*)'", definitions)
    for event in ALERT_EVENTS:
        assert f'traces | where message has "event={event}"' in queries, f"no alert for event={event}"
    props = rules.body.block("properties")
    assert props.entries()["scopes"].replace(" ", "").replace("\n", "") == "[appInsightsId]"
    criterion = props.block("criteria").entries()["allOf"]
    assert "query: a.query" in criterion
    assert re.search(r"operator:\s*'GreaterThan'", criterion) and re.search(r"threshold:\s*0\b", criterion)
    assert bicep("main.bicep").module("alerts").block("params").entries()["appInsightsId"] == \
        "monitoring.outputs.appInsightsId"
    assert alerts.resource("Microsoft.Insights/actionGroups").condition == "hasEmail"


# ---------------------------------------------------------------------------------------------------------------
# azd, workflows, packaging, local settings


def minimal_yaml(text: str) -> dict[str, object]:
    """Nested block mappings of ``key: value`` lines (enough for azure.yaml); no lists or flow style."""
    root: dict[str, object] = {}
    stack: list[tuple[int, dict[str, object]]] = [(-1, root)]
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        m = re.fullmatch(r"([\w.-]+):(?:\s+(.*))?", line.strip())
        assert m, f"unsupported YAML line: {raw!r}"
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if m.group(2) is None:
            child: dict[str, object] = {}
            parent[m.group(1)] = child
            stack.append((indent, child))
        else:
            parent[m.group(1)] = m.group(2).strip().strip("'\"")
    return root


def test_azure_yaml() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    doc = minimal_yaml(text)
    assert doc["name"] == "d365-migration"
    services = doc["services"]
    assert isinstance(services, dict)
    assert services["api"] == {"project": ".", "language": "python", "host": "function"}
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return
    assert yaml.safe_load(text)["services"]["api"]["host"] == "function"


def test_ci_workflow_runs_make_test() -> None:
    text = (WORKFLOWS / "ci.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s*pull_request:", text, re.MULTILINE) and re.search(r"^\s*push:", text, re.MULTILINE)
    assert re.search(r"^\s*(-\s*)?run:\s*make test\s*$", text, re.MULTILINE)
    assert re.search(r"python-version:\s*[\"']?3\.13", text)
    assert re.search(r"node-version:\s*[\"']?20", text)


def test_release_workflow_builds_and_uploads_the_assets() -> None:
    text = (WORKFLOWS / "release.yml").read_text(encoding="utf-8")
    assert re.search(r"tags:\s*\[\s*[\"']v\*[\"']\s*\]", text) or re.search(r"tags:\s*\n\s*-\s*[\"']?v\*", text)
    assert "scripts/build_package.sh" in text
    assert "az bicep build --file infra/main.bicep" in text
    assert "softprops/action-gh-release" in text or "gh release upload" in text
    for asset in ("d365-migration.zip", "main.json"):
        assert asset in text


def test_funcignore_keeps_local_only_files_out() -> None:
    lines = {line.strip() for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()}
    for entry in ("tests/", ".venv/", "node_modules/", "local.settings.json", ".vscode/", "infra/",
                  "d365_tooling/", "scripts/", ".github/", "*.md"):
        assert entry in lines, f".funcignore must list {entry}"


def test_local_settings_example() -> None:
    from d365_migration._settings import load_settings

    data = json.loads((ROOT / "local.settings.example.json").read_text(encoding="utf-8"))
    assert data["IsEncrypted"] is False
    values = data["Values"]
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["PARTNER_CENTER_AUTH"] == "none" and values["DRY_RUN"] == "true"
    assert "PARTNER_CENTER_CLIENT_SECRET" not in values and "PARTNER_CENTER_REFRESH_TOKEN" not in values
    assert set(values) <= set(APP_SETTINGS) | {"FUNCTIONS_WORKER_RUNTIME"}
    settings = load_settings(values)  # valid as written (loopback sandbox, no auth)
    assert settings.dry_run and settings.replacement_offers.mapping


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_package_layout(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "build_package.sh"
    assert os.access(script, os.X_OK), "scripts/build_package.sh must be executable"
    out = tmp_path / "pkg.zip"
    env = {**os.environ, "SKIP_DEPS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    names = zipfile.ZipFile(out).namelist()
    assert "host.json" in names and "requirements.txt" in names and "d365_migration/_settings.py" in names
    for name in names:
        assert not name.startswith(("d365_tooling/", "tests/", "infra/",
                                    ".venv/", "node_modules/", "scripts/")), name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name
    for folder in FUNCTION_FOLDERS:
        if (ROOT / folder / "function.json").is_file():
            assert f"{folder}/function.json" in names
