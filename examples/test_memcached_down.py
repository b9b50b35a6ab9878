"""Is your web application still working in degraded mode when memcached is down?
Against a real memcached.

examples/memcached_down.py is the application: a WSGI app that caches its
pages in memcached.  A real memcached starts once for this module (on an
ephemeral port, as an unprivileged user), and each test serves the app on
an ephemeral port, its cache through an in-process Vaurien proxy in front of
memcached, and makes memcached fail three ways: down (proxy.down(): connects
refused, live connections closed), hung (hang: requests swallowed, never
answered; the app's client times out) and failing (errors, protocol
memcache: "SERVER_ERROR Service Unavailable").  The pages must keep coming,
200, rendered (so slower), and the cache must be used and refilled again as
soon as memcached is back.

Each test runs twice: with App, which passes, and with BrokenApp (no
timeout, nothing caught), marked xfail(strict=True): 500s, or a request that
hangs until the test's HTTP client gives up (5 s).  From the repository root:

    python3 -m pytest -q examples/test_memcached_down.py
"""
import collections
import http.client
import os
import socket
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import real_servers  # noqa: E402
import vaurien  # noqa: E402
from memcached_down import RENDER_SECONDS, App, BrokenApp, CacheError, Memcache, serve  # noqa

HTTP_TIMEOUT = 5.0   # a page that takes longer is a hung page

Site = collections.namedtuple('Site', 'proxy app address')

# How memcached fails: what makes it fail, and what a client sees then.
FAILURES = {
    'down': (lambda proxy: proxy.down(), ConnectionRefusedError),
    'hang': (lambda proxy: proxy.with_handler('hang'), socket.timeout),
    'errors': (lambda proxy: proxy.with_handler('errors', protocol='memcache'), CacheError),
}


@pytest.fixture(scope='module')
def memcached():
    reason = real_servers.missing('memcached')
    if reason:
        pytest.skip(reason)
    with real_servers.memcached() as server:
        yield server


@pytest.fixture(params=['App', pytest.param('BrokenApp', marks=pytest.mark.xfail(
    strict=True, raises=(AssertionError, socket.timeout),
    reason='BrokenApp answers 500, or hangs, while memcached fails'))])
def site(request, memcached):
    """The app (App or BrokenApp) served on an ephemeral port, its cache through a proxy."""
    flush(memcached.address)
    proxy = vaurien.Proxy('127.0.0.1:0', '%s:%d' % memcached.address).start()
    if request.param == 'App':
        app = App(Memcache(proxy.address))
    else:
        app = BrokenApp(Memcache(proxy.address, timeout=None))
    server = serve(app)
    try:
        yield Site(proxy, app, server.server_address)
    finally:
        proxy.stop()    # first: it ends the connection that a hung request waits on
        server.shutdown()
        server.server_close()
        app.cache.close()


def flush(address):
    """Empty memcached, so that each test starts with a cold cache."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b'flush_all\r\n')
        assert sock.recv(100) == b'OK\r\n'


def get(site, name):
    """(status, X-Cache, seconds) of GET /profile/NAME; checks the page."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(*site.address, timeout=HTTP_TIMEOUT)
    try:
        conn.request('GET', '/profile/' + name)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status == 200:
        assert body == ('<h1>%s</h1>\n' % name).encode()
    return response.status, response.getheader('X-Cache'), time.monotonic() - started


@pytest.mark.parametrize('failure', FAILURES)
def test_pages_keep_coming_while_memcached_fails(site, failure):
    making, seen_by_a_client = FAILURES[failure]
    assert get(site, 'alice')[:2] == (200, 'miss')      # rendered and cached
    assert get(site, 'alice')[:2] == (200, 'hit')
    renders = site.app.renders
    with making(site.proxy):
        with pytest.raises(seen_by_a_client):
            Memcache(site.proxy.address).get(b'profile:alice')
        for name in ('alice', 'bob', 'alice'):
            status, cache, seconds = get(site, name)
            assert (status, cache) == (200, 'error')    # degraded: rendered each time...
            assert seconds >= RENDER_SECONDS            # ... so slower
        assert site.app.renders == renders + 3
    # memcached is back: the cache serves again, and is refilled
    assert get(site, 'alice')[:2] == (200, 'hit')
    assert get(site, 'bob')[:2] == (200, 'miss')
    assert get(site, 'bob')[:2] == (200, 'hit')
    assert site.app.renders == renders + 4
