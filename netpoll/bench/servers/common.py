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
    return ap
