"""What the tests share, one module per concept: paths, waits, ports, private services, worker
processes, configuration, request bodies, AMQP peers, queue reading, the ledger, the fault table.

Nothing here imports pytest at module level but what needs to skip or stash (services, faults):
``bench/`` imports :mod:`tests.support.processes` to start the same worker processes.
"""
