"""The wiring: the ``stilltag`` command line, the one place that puts the packages together.

Imports go one way (README, "Code map"; checked by import-linter, ``[tool.importlinter]`` in
pyproject.toml): ``stilltag`` → ``bench`` → ``demo`` → ``worker`` | ``training`` → ``shared``.
"""
