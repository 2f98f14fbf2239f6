#!/usr/bin/env python3
"""Moved into the package: ``python -m netpoll.bench client`` (netpoll/bench/client.py).
This path keeps working for old commands; it takes the same options."""
import sys

from netpoll.bench import client

if __name__ == "__main__":
    sys.exit(client.main(sys.argv[1:]))
