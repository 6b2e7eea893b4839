"""Entry points: the ``jennah`` command and the processes it starts.

The only code that imports the roles (``worker``, ``gateway``) and puts them in front of a
server; nothing imports this package (docs/design.md §13). ``cli`` is the ``jennah``
command, ``worker``/``gateway`` its two servers (built by ``worker_app``/``gateway_app``
on import, served by ``serve``), ``dev`` the local stack, ``keys`` and ``wal`` the
operator commands.
"""
