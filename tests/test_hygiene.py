"""Project hygiene (issue 11 item 8): licence, security policy, changelog, a release workflow that can really run,
and a README that documents only commands that exist and promises no Deploy-to-Azure button before a release."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from d365_migration.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
RELEASE = (ROOT / ".github" / "workflows" / "release.yml").read_text(encoding="utf-8")


def test_license_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_security_policy_says_how_to_report_and_what_the_tool_can_spend() -> None:
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    for heading in ("## Reporting a vulnerability", "## What this tool can spend", "## Safe defaults"):
        assert heading in text
    assert "do not open a public issue" in text and "Report a vulnerability" in text
    assert "rollout set --live" in text and "--all-customers" in text and "cancel" in text


def test_changelog_follows_keep_a_changelog_with_this_work_unreleased() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in text
    sections = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert sections and sections[0] == "Unreleased"
    unreleased = text.split("## [Unreleased]", 1)[1]
    for entry in ("rollout", "offers", "cancel", "LICENSE", "SECURITY.md"):
        assert entry in unreleased


def test_readme_promises_no_deploy_button_before_a_release_and_says_how_to_make_one() -> None:
    assert "deploytoazurebutton" not in README.lower()
    assert not re.search(r"\[[^\]]*deploy to azure[^\]]*\]\(", README, re.IGNORECASE)
    assert "No release has been published yet" in README and "git tag v" in README


def _documented_commands() -> list[str]:
    commands, in_code = [], False
    for raw in README.splitlines():
        if raw.startswith("```"):
            in_code = not in_code
            continue
        line = raw.split("  #")[0].strip()
        if in_code and line.startswith("python -m d365_migration "):
            commands.append(line[len("python -m d365_migration "):])
    return commands


@pytest.mark.parametrize("command", [c for c in _documented_commands()
                                     if c.split()[0] in ("rollout", "offers", "cancel")])
def test_every_documented_rollout_offers_and_cancel_command_parses(command: str) -> None:
    args = shlex.split(command.replace("<", "").replace(">", "").replace("customer id", "x").replace(
        "old subscription id", "y"))
    build_parser().parse_args(args)  # SystemExit (a failure) on an unknown option


def test_release_workflow_can_run_on_the_versions_the_project_uses() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    required = re.search(r"sys\.version_info\[:2\] == \((\d+), (\d+)\)", makefile)
    assert required, "the Makefile no longer says which Python it needs"
    test_job = RELEASE.split("\n  release:", 1)[0]
    assert f'python-version: "{required.group(1)}.{required.group(2)}"' in test_job, \
        "the release's test job must use the Python version `make test` requires"
    # the build job reads the runtime version from the template; the expression must find it in today's file
    sed = re.search(r'sed -n "(s/\^param pythonVersion[^"]+)"', RELEASE)
    assert sed, "the build job no longer reads pythonVersion from infra/app/api.bicep"
    script = sed.group(1).replace("\\\\", "\\")
    found = subprocess.run(["sed", "-n", script, str(ROOT / "infra" / "app" / "api.bicep")], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert re.fullmatch(r"3\.\d+", found), found
    assert "python-version: ${{ steps.runtime.outputs.python }}" in RELEASE
    assert "Check the assets" in RELEASE and "fail_on_unmatched_files: true" in RELEASE
