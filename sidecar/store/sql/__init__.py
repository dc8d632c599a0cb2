"""The SQL backends. Repositories (``Sql*``) are written once with ``?`` placeholders and run on
SQLite directly and on PostgreSQL through ``qmark.QmarkConnection``; ``sqlite`` and ``postgres``
hold what differs (connections, transactions, the change log's locking); ``migrations`` holds
the versioned schema of each dialect."""
