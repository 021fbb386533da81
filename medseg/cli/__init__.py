"""The ``medseg`` command line. Thin: parses arguments, calls the Python API, maps errors to exit codes."""
