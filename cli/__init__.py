"""The ``mesimp`` command line (installed as ``mesimp.cli``)."""
