"""Local stand-in for the Azure Functions host (Core Tools cannot be installed here). Not the real host.

* :class:`LocalHost` runs the app's v1 function folders over real Storage queues (Azurite);
* :func:`check_function_folder` checks one function folder: the host's function.json rules, then a load in the real
  Python worker (``azure-functions-runtime-v1``);
* :class:`AzuriteProcess` starts a private Azurite on loopback.

CLI: ``python -m d365_tooling.localhost --help``.
"""

from ._host import FunctionStats, LocalHost, RunReport
from ._loader import FunctionLoadError, check_function_folder
from ._settings import HostSettings
from .azurite import AzuriteError, AzuriteProcess

__all__ = [
    "AzuriteError",
    "AzuriteProcess",
    "FunctionLoadError",
    "FunctionStats",
    "HostSettings",
    "LocalHost",
    "RunReport",
    "check_function_folder",
]
