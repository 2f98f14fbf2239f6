#!/usr/bin/env python3
"""Moved into the package: ``python -m netpoll.bench`` (netpoll/bench/driver.py).
This path keeps working for old commands; it takes the same options."""
import sys

from netpoll.bench import driver

if __name__ == "__main__":
    sys.exit(driver.main(sys.argv[1:]))
