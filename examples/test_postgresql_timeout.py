"""Are you sending back the right 503s when PostgreSQL times out?  Against a
real PostgreSQL.

examples/postgresql_timeout.py is the application: a WSGI app backed by
PostgreSQL through a pool of pg8000 connections.  A real PostgreSQL starts
once for this module (initdb then postgres, on an ephemeral port, in a
temporary directory, as an unprivileged user; about half a second), and
each test serves the app on an ephemeral port, its database through an
in-process Vaurien proxy, and makes PostgreSQL fail: slow (delay, 4 times
the app's timeout), hung (hang), refusing clients (errors, protocol
postgresql: "FATAL: sorry, too many clients already", SQLSTATE 53300) or
starting up (the same with code 57P03).  The app must answer 503 with
Retry-After (not 500, not a hang), from its pooled connection as from a new
one, and 200 right after.

Each test runs twice: with App, which passes, and with BrokenApp (no
timeout, nothing caught), marked xfail(strict=True): slow 200s, 500s, or a
request that hangs until the test's HTTP client gives up (5 s).  From the
repository root:

    python3 -m pytest -q examples/test_postgresql_timeout.py
"""
import collections
import http.client
import os
import socket
import sys

import pytest

pg8000 = pytest.importorskip('pg8000')

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import real_servers  # noqa: E402
import vaurien  # noqa: E402
from postgresql_timeout import TIMEOUT, App, BrokenApp, Pool, serve  # noqa: E402

HTTP_TIMEOUT = 5.0   # an answer that takes longer is a hung request

Site = collections.namedtuple('Site', 'proxy address')

# How PostgreSQL fails: what makes it fail; what a new pg8000 connection meets
# then: an exception, and the SQLSTATE of the server's error (None: none).
FAILURES = {
    'slow': (lambda proxy: proxy.with_handler('delay', sleep=4 * TIMEOUT),
             socket.timeout, None),
    'hung': (lambda proxy: proxy.with_handler('hang'), socket.timeout, None),
    'too-many-clients': (lambda proxy: proxy.with_handler('errors', protocol='postgresql'),
                         pg8000.exceptions.DatabaseError, '53300'),
    'starting-up': (lambda proxy: proxy.with_handler(
        'errors', protocol='postgresql', code='57P03',
        message='the database system is starting up'), pg8000.exceptions.DatabaseError, '57P03'),
}


@pytest.fixture(scope='module')
def postgresql():
    reason = real_servers.missing('postgresql')
    if reason:
        pytest.skip(reason)
    with real_servers.postgresql() as server:
        yield server


@pytest.fixture(params=['App', pytest.param('BrokenApp', marks=pytest.mark.xfail(
    strict=True, raises=(AssertionError, socket.timeout),
    reason='BrokenApp answers slow 200s, 500s, or hangs'))])
def site(request, postgresql):
    """The app (App or BrokenApp) served on an ephemeral port, its database through a proxy."""
    proxy = vaurien.Proxy('127.0.0.1:0', '%s:%d' % postgresql.address).start()
    if request.param == 'App':
        pool = Pool(*proxy.address, user='postgres')
        app = App(pool)
    else:
        pool = Pool(*proxy.address, timeout=None, user='postgres')
        app = BrokenApp(pool)
    server = serve(app)
    try:
        yield Site(proxy, server.server_address)
    finally:
        proxy.stop()    # first: it ends the connection that a hung request waits on
        server.shutdown()
        server.server_close()
        pool.close()


def get(site):
    """(status, Retry-After, body) of GET /answer."""
    conn = http.client.HTTPConnection(*site.address, timeout=HTTP_TIMEOUT)
    try:
        conn.request('GET', '/answer')
        response = conn.getresponse()
        return response.status, response.getheader('Retry-After'), response.read()
    finally:
        conn.close()


@pytest.mark.parametrize('failure', FAILURES)
def test_503_while_postgresql_fails(site, failure):
    making, seen_by_a_client, sqlstate = FAILURES[failure]
    assert get(site) == (200, None, b'42\n')   # the pool keeps that connection
    with making(site.proxy):
        with pytest.raises(seen_by_a_client) as error:
            pg8000.native.Connection('postgres', host=site.proxy.address[0],
                                     port=site.proxy.address[1], timeout=TIMEOUT)
        if sqlstate:
            assert error.value.args[0]['C'] == sqlstate
        # the pooled connection fails, then a new one: each answered with a 503
        assert get(site) == (503, '1', b'try again later\n')
        assert get(site) == (503, '1', b'try again later\n')
    assert get(site) == (200, None, b'42\n')   # right after
