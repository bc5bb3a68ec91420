"""Serving: the Triton model repository, the tritonserver process and the `embedline serve` supervisor.

The layer above export (docs/architecture.md): it reads artifacts and their exported variants, and
nothing below it imports it.

    settings.py    RepositorySettings and the server options `serve` and `build-repo` share
    repository.py  artifact -> Triton model repository (`embedline build-repo`)
    triton.py      one tritonserver process: command line, start, readiness, model processes, stop
    launcher.py    `embedline serve`: supervision (crash restarts, drain), API key, TLS
"""
