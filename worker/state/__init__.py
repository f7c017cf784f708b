"""What lives in Redis: the budget ledger, the result store, the response cache, single flight.

Every redis-py error is translated once, in :mod:`worker.state.redis`, into our
:class:`~worker.errors.StoreUnavailable` tree; nothing above this package catches a Redis error.
"""
