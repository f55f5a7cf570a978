"""The ``lmx`` command line: one module per command, dispatched by :mod:`lmx.cli.main`."""
