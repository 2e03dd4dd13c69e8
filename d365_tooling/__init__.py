"""Developer tooling for d365-migration: never deployed (``.funcignore`` and ``scripts/build_package.sh`` leave it
out), and never imported by the app.

* :mod:`d365_tooling.sandbox` -- a Partner Center sandbox that follows the documented shapes and behaviours;
* :mod:`d365_tooling.localhost` -- a local runner for the function folders: the real Python worker
  (``azure-functions-runtime-v1``) loads and invokes them, the runner stands in for the .NET host's queues;
* :mod:`d365_tooling.demo` -- ``make demo``: sandbox + Azurite + the whole chain + an independent check of the
  sandbox's state (``verify_world``);
* :mod:`d365_tooling.faults` and :mod:`d365_tooling.soak` -- the fault-injection harness and the soak matrix;
* :mod:`d365_tooling.bench` -- ``make bench``.

The CLI's ``sandbox``, ``demo`` and ``run`` commands load :mod:`d365_tooling.demo` by name, so they work from a
clone of the repository.
"""
