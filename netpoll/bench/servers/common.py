"""Pieces shared by the benchmark servers (each runs as its own script)."""
import argparse
import resource


def raise_nofile():
    """Raise the soft fd limit to the hard one (256+ connections per run)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def base_parser(doc):
    """The options every benchmark server takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("echo", "framed"), default="echo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 lets the OS choose (printed in READY)")
    ap.add_argument("--unix", default=None, help="listen on this Unix socket path instead")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), default=None,
                    help="serve TLS with this certificate chain and key (PEM)")
    return ap


def server_context(args):
    """The server's ssl.SSLContext for --tls CERT KEY (None without --tls).

    Python's defaults (TLS 1.2+, its cipher list, two session tickets) for every
    server alike, so they all negotiate the same TLS 1.3 suite with the load
    generator and differ only in where the record work runs.
    """
    if args.tls is None:
        return None
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.tls[0], args.tls[1])
    return ctx
