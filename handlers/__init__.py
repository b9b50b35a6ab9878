"""Protocol-aware handlers for Vaurien, one plain module per backend.

Each function here is an ordinary Vaurien handler, ``handler(source, dest,
to_backend, name, settings, proxy)``, documented like the built-in ones so
that its settings are typed, validated and listed by ``--list-handlers``.
Wire one in with an ini file (run vaurien from the directory that holds
``handlers/``, or put it on PYTHONPATH)::

    [vaurien]
    distant = localhost:6379
    local = localhost:8000
    behavior = 100:loading

    [handler:loading]
    callable = handlers.redis.loading
    warmup = 10

Modules: ``handlers.http`` (slow_paths, status_on_paths), ``handlers.redis``
(loading), ``handlers.mysql`` (gone_away), ``handlers.ldap`` (busy).
"""
