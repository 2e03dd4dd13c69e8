#!/usr/bin/env bash
# Build the ready-to-run function app package (the release asset d365-migration.zip).
#
#   scripts/build_package.sh [OUTPUT_ZIP]          default: dist/d365-migration.zip
#
# The zip holds host.json, requirements.txt, the function folders, d365_migration/ (without the local-only
# sandbox/ and localhost/ packages) and .python_packages/lib/site-packages with the dependencies, installed for
# Linux x86_64 + CPython 3.13 (what Flex Consumption runs). It is deployed with remoteBuild=false (onedeploy from
# infra/app/deploy.bicep, or `az functionapp deployment source config-zip`), so nothing is built in Azure.
#
# On Linux with Python 3.13 the dependencies are installed normally; anywhere else pip is asked for manylinux
# wheels for CPython 3.13 (binary-only), so the zip is still right for Azure.
#
# Environment: PYTHON (default python3.13, else python3); SKIP_DEPS=1 skips the pip step (layout checks only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT="${1:-dist/d365-migration.zip}"
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
TARGET_PY="3.13"
FUNCTIONS=(detect_expiring purchase_new reassign_licenses suspend_old scan_customers status)

if [[ -z "${PYTHON:-}" ]]; then
  # The first candidate that really runs (a pyenv shim may exist for a version that is not selected).
  PYTHON=python3
  for candidate in python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
    if "$candidate" -c 'import sys' >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/d365-package.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

# ---- Application files (explicit allow-list) ----------------------------------------------------------------
for f in host.json requirements.txt; do
  [[ -f "$f" ]] || { echo "error: $f is missing" >&2; exit 1; }
  cp "$f" "$STAGE/"
done

included=()
for fn in "${FUNCTIONS[@]}"; do
  if [[ -f "$fn/function.json" ]]; then
    cp -R "$fn" "$STAGE/$fn"
    included+=("$fn")
  elif [[ -d "$fn" ]]; then
    echo "warning: $fn/ has no function.json; skipped" >&2
  fi
done
if [[ ${#included[@]} -eq 0 ]]; then
  echo "warning: no function folders with function.json found; the package has no functions" >&2
fi

cp -R d365_migration "$STAGE/d365_migration"
find "$STAGE" \( -name '__pycache__' -o -name '.pytest_cache' -o -name '.mypy_cache' \) -type d -prune \
  -exec rm -rf {} +
find "$STAGE" \( -name '*.pyc' -o -name '*.pyo' \) -type f -delete

# ---- Dependencies -------------------------------------------------------------------------------------------
SITE="$STAGE/.python_packages/lib/site-packages"
mkdir -p "$SITE"
if [[ "${SKIP_DEPS:-0}" == "1" ]]; then
  echo "SKIP_DEPS=1: dependencies not installed (this zip is NOT deployable)" >&2
else
  py_ver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [[ "$(uname -s)" == "Linux" && "$(uname -m)" == "x86_64" && "$py_ver" == "$TARGET_PY" ]]; then
    "$PYTHON" -m pip install --disable-pip-version-check --no-compile -r requirements.txt --target "$SITE"
  else
    echo "building on $(uname -s)/$(uname -m) with Python $py_ver: fetching manylinux wheels for CPython $TARGET_PY" >&2
    "$PYTHON" -m pip install --disable-pip-version-check --no-compile -r requirements.txt --target "$SITE" \
      --platform manylinux2014_x86_64 --implementation cp --python-version "$TARGET_PY" --only-binary=:all:
  fi
  find "$SITE" -name '__pycache__' -type d -prune -exec rm -rf {} +
fi

# ---- Zip (stable order, no timestamps from the build machine) -------------------------------------------------
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
"$PYTHON" - "$STAGE" "$OUT" <<'PY'
import os
import sys
import zipfile

stage, out = sys.argv[1], sys.argv[2]
paths = []
for base, dirs, files in os.walk(stage):
    dirs.sort()
    for name in sorted(files):
        paths.append(os.path.join(base, name))
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for path in paths:
        arcname = os.path.relpath(path, stage).replace(os.sep, "/")
        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (os.stat(path).st_mode & 0o777) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(path, "rb") as fh:
            zf.writestr(info, fh.read())
print(f"wrote {out} ({len(paths)} files)")
PY
echo "functions: ${included[*]:-(none)}"
