"""One module per workflow step, each a ``run(cfg, ...)`` function that ``workflow/scripts/<step>.py`` calls.

A step is wiring: it reads its inputs, calls the library modules whose subject the work is, and writes its
outputs atomically. Every path comes from the orchestrator, and every step module imports only what its step
runs, so the stage table (moralign.pipeline) can declare each step's code dependencies from its imports.
"""
