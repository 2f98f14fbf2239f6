# Python's ssl module first: netpoll._core.tls links libssl and must resolve
# it to the library _ssl already loaded (one OpenSSL in the process; the
# dynamic loader reuses a loaded library of the same soname).
import ssl  # noqa: F401
