"""Shared fixtures. Azurite and the sandbox are started on loopback by the plugins below and stopped after."""

pytest_plugins = ["tests._azurite_plugin", "tests._sandbox_plugin"]
