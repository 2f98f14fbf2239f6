"""Build script: cythonizes every module in netpoll/_core, and the benchmark's
native load generator (netpoll/bench/_loadgen.pyx: bench code, kept out of the
core package; the library never imports it).

Directives are chosen per the code's guarantees: the hot-path modules index
C arrays whose bounds they check themselves, so bounds/wraparound checks are
off; ``embedsignature`` keeps signatures in docstrings for help() and the docs;
``freethreading_compatible`` (Cython >= 3.1) declares every module safe without
the GIL (Py_MOD_GIL_NOT_USED), per the audit in docs/freethreading.md.

Environment knobs (documented in README.md):

- ``NETPOLL_SANITIZE=address`` builds with AddressSanitizer (debug symbols, -O1).
- ``NETPOLL_DEBUG=1`` builds with -O0 -g and Cython line tracing off.
"""
import os
import sys
from glob import glob

from setuptools import Extension, setup

from Cython.Build import cythonize

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("netpoll", "_core", "includes")

compile_args = ["-O2", "-pthread", "-fno-strict-aliasing"]
link_args = ["-pthread"]
sanitize = os.environ.get("NETPOLL_SANITIZE", "")
if sanitize:
    compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", f"-fsanitize={sanitize}"]
    link_args = ["-pthread", f"-fsanitize={sanitize}"]
elif os.environ.get("NETPOLL_DEBUG"):
    compile_args = ["-O0", "-g", "-pthread"]

# TLS (netpoll/_core/tls.pyx, and the benchmark load generator) links the
# system's libssl/libcrypto: it must be the library Python's ssl module uses
# (tls.pyx checks at run time). Headers: libssl-dev on Debian/Ubuntu;
# NETPOLL_OPENSSL_PREFIX points at another installation (include/, lib/).
OPENSSL_USERS = {"netpoll._core.tls", "netpoll.bench._loadgen"}
ssl_prefix = os.environ.get("NETPOLL_OPENSSL_PREFIX", "")
ssl_include = [os.path.join(ssl_prefix, "include")] if ssl_prefix else []
ssl_libdirs = [os.path.join(ssl_prefix, "lib")] if ssl_prefix else []

extensions = []
sources = sorted(glob(os.path.join("netpoll", "_core", "*.pyx")))
sources.append(os.path.join("netpoll", "bench", "_loadgen.pyx"))
for pyx in sources:
    name = pyx[:-4].replace(os.sep, ".")
    libraries = [] if sys.platform == "darwin" else ["rt"]
    include_dirs = [INCLUDES]
    library_dirs = []
    if name in OPENSSL_USERS:
        libraries += ["ssl", "crypto"]
        include_dirs += ssl_include
        library_dirs += ssl_libdirs
    extensions.append(
        Extension(
            name,
            [pyx],
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            libraries=libraries,
        )
    )

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
    "binding": False,
    # Every module is audited for running without the GIL (docs/freethreading.md):
    # on a free-threaded interpreter importing netpoll must leave the GIL off.
    "freethreading_compatible": True,
}

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=[os.path.join(HERE)],
        quiet=True,
    ),
)
