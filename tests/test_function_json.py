"""Every function folder of the app loads in the real Python worker (``azure-functions-runtime-v1``).

Folders are discovered at collection time (any top-level folder with a function.json), so new functions are
checked without editing this file. ``d365_tooling.localhost.check_function_folder`` applies the .NET host's
function.json rules, then sends the real worker a ``FunctionLoadRequest``: any rejection fails the test with the
worker's own message -- the error Azure would only report at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d365_tooling.localhost import FunctionLoadError, check_function_folder

REPO = Path(__file__).resolve().parents[1]
FUNCTION_FOLDERS = sorted(p for p in REPO.iterdir() if p.is_dir() and (p / "function.json").is_file())


@pytest.mark.parametrize("folder", FUNCTION_FOLDERS, ids=[p.name for p in FUNCTION_FOLDERS])
def test_function_folder_loads(folder: Path) -> None:
    check_function_folder(folder)


def test_checker_rejects_a_broken_folder(tmp_path: Path) -> None:
    """The same check fails for a folder the worker would refuse (out binding without func.Out)."""
    folder = tmp_path / "fj_broken_function"
    folder.mkdir()
    (folder / "function.json").write_text(
        json.dumps(
            {
                "bindings": [
                    {"name": "msg", "type": "queueTrigger", "direction": "in", "queueName": "q"},
                    {"name": "out", "type": "queue", "direction": "out", "queueName": "q2"},
                ]
            }
        )
    )
    (folder / "__init__.py").write_text(
        "import azure.functions as func\n\n\ndef main(msg: func.QueueMessage, out: str) -> None: ...\n"
    )
    with pytest.raises(FunctionLoadError, match=r"azure\.functions\.Out"):
        check_function_folder(folder)
