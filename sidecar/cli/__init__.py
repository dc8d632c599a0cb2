"""The ``spauth`` command: one module per command group; it talks only to the admin API."""
