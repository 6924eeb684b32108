"""Programs that use the server from outside it, over HTTP or from a process of their own.

- client.py    httpx clients for robots and simulators (sync and async, JSON or msgpack)
- drive.py     `worldplan drive`: a gymnasium environment driven through the service
- loadtest.py  `worldplan loadtest`: many sessions stepping at once
- soak.py      `worldplan loadtest --mix`: good, bad, retried and abandoned sessions
- bench.py     `worldplan bench`: in-process and HTTP latency, throughput with and without batching
- memory.py    `worldplan bench-memory`: the memory one session takes in each store
- local.py     real servers on loopback ports, for the benchmarks and the tests

The server (the rest of service/) never imports from here; tests/test_layout.py checks it.
"""
