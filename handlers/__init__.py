"""Protocol-aware handlers for Vaurien, one plain module per backend.

Each function here is an ordinary Vaurien handler, ``handler(source, dest,
to_backend, name, settings, proxy)``, documented like the built-in ones so
that its settings are typed, validated and listed by ``--list-handlers``.
Wire one in with an ini file, by its name ``vaurien_handlers.*``: pip
installs this folder under that name, and vaurien.py finds it by that name
beside itself in a checkout or a vendored copy::

    [vaurien]
    distant = localhost:6379
    local = localhost:8000
    behavior = 100:loading

    [handler:loading]
    callable = vaurien_handlers.redis.loading
    warmup = 10

Modules: ``vaurien_handlers.http`` (slow_paths, status_on_paths),
``vaurien_handlers.redis`` (loading), ``vaurien_handlers.mysql`` (gone_away),
``vaurien_handlers.ldap`` (busy).
"""

VAURIEN_HANDLERS = True   # how vaurien.py knows this folder beside it is its own
