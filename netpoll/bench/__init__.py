"""Side-by-side benchmark of netpoll against asyncio, uvloop and a thread per
connection, with the native load generator. Run it as ``python -m netpoll.bench``
(``--help`` for the options) or ``python -m netpoll.bench client HOST:PORT`` to
drive any echo server. Not imported by ``netpoll`` itself."""
