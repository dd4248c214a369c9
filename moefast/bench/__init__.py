"""``python -m moefast.bench``: moefast's ops and MoE layer side by side with what users run today.

See ``bench/README.md`` for what is timed and what each figure means; :func:`main` is the command
(``main(["--quick", "--out", "run.json"])`` from Python).
"""

from .cli import main

__all__ = ["main"]
