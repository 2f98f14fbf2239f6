"""``python -m netpoll.bench [options]``: the side-by-side comparison (driver.py).
``python -m netpoll.bench client HOST:PORT [options]``: the load generator alone."""
import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        from netpoll.bench import client
        return client.main(sys.argv[2:])
    from netpoll.bench import driver
    return driver.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
