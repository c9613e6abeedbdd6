"""The one exception for bad input, in a module every other module can import without a circle.

``DataError`` covers every fault of what a user hands the workflow: a damaged release archive or record, a
model folder without weights, an adapter of another base model, prediction or score files of another dataset
or run. Its message says where, in the user's terms (the archive and the member inside it, the folder, the
file), and why; the step scripts print it as one line (:func:`moralign.cli.run`). Configuration faults have
their own :class:`ConfigError` (re-exported by moralign.config).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and the fix."""


class DataError(ValueError):
    """Bad input; the message names the file (archive, member, line, field where there is one) and the reason."""
