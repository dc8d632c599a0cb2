"""The compiled Check path (sidecar/dataplane/_fastcheck.c) as an optional extension: built where
a C compiler and the Python headers exist; where they do not, the build skips it
(``optional=True``: setuptools' build_ext catches the compile or link error) and the sidecar
runs the pure-Python path (sidecar/dataplane/fastcheck.py logs which one is active).
Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sidecar.dataplane._fastcheck",
            ["sidecar/dataplane/_fastcheck.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-missing-braces"],
        ),
        # The compiled audit ingest step (sidecar/core/audit_native.py), optional the same way.
        Extension(
            "sidecar.core._auditchain",
            ["sidecar/core/_auditchain.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-ffp-contract=off"],
        ),
        # The packed key table in C (sidecar/replication/packing.py builds the control plane's
        # snapshot with it, sidecar/core/packed.py checks a received table's id order).
        Extension(
            "sidecar.core._packing",
            ["sidecar/core/_packing.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        # The audit spool's framing in C (sidecar/auditship/spool.py ``frames``), optional the
        # same way (it also needs zlib's headers): without it the writer frames each record in
        # Python.
        Extension(
            "sidecar.auditship._frames",
            ["sidecar/auditship/_frames.c"],
            optional=True,
            libraries=["z"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
    ]
)
