"""What happens if the MySQL server is restarted?  Against a real MariaDB.

examples/mysql_restart.py is the application: a hit counter on a pool of
PyMySQL connections.  A real MariaDB server starts once for this module (on
an ephemeral port, in a temporary directory, as an unprivileged user; about
half a second), and each test puts an in-process Vaurien proxy in front of
it, shapes a restart, and checks that the service fails cleanly while the
server is away and works again as soon as it is back.

Each test runs twice: with Pool, which survives, and with NaivePool, which
keeps its dead connection: marked xfail(strict=True), so that these tests
would fail if they stopped catching it.  From the repository root:

    python3 -m pytest -q examples/test_mysql_restart.py
"""
import contextlib
import os
import sys
import time

import pytest

pymysql = pytest.importorskip('pymysql')

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import real_servers  # noqa: E402
import vaurien  # noqa: E402
from mysql_restart import SCHEMA, HitCounter, NaivePool, Pool  # noqa: E402

LOST = 2013      # "Lost connection to MySQL server during query"
REFUSED = 2003   # "Can't connect to MySQL server on ..."
TOO_MANY = 1040  # "Too many connections", the server's ERR packet


@pytest.fixture(scope='module')
def mariadb():
    """A real MariaDB server for this module, with database `demo` and its table."""
    reason = real_servers.missing('mariadb')
    if reason:
        pytest.skip(reason)
    with real_servers.mariadb() as server:
        conn = connect(server.address)
        with conn.cursor() as cursor:
            cursor.execute('CREATE DATABASE demo')
            cursor.execute('USE demo')
            cursor.execute(SCHEMA)
        conn.close()
        yield server


@pytest.fixture
def proxy(mariadb):
    with vaurien.Proxy('127.0.0.1:0', '%s:%d' % mariadb.address) as proxy:
        yield proxy


@pytest.fixture(params=[Pool, pytest.param(NaivePool, marks=pytest.mark.xfail(
    strict=True, raises=(pymysql.err.OperationalError, pymysql.err.InterfaceError),
    reason='NaivePool hands out its dead connection: 2013, then InterfaceError(0, \'\') for ever'))])
def counter(request, proxy):
    """The service, through the proxy, on each pool."""
    pool = request.param(*proxy.address, user='root', database='demo')
    yield HitCounter(pool)
    pool.close()


def connect(address):
    return pymysql.connect(host=address[0], port=address[1], user='root', connect_timeout=5,
                           read_timeout=5, write_timeout=5)


def close(conn):
    """Close one of the test's own connections, dead or alive."""
    with contextlib.suppress(pymysql.err.Error):
        conn.close()


def query(conn):
    with conn.cursor() as cursor:
        cursor.execute('SELECT 1')
        return cursor.fetchone()[0]


def code(call):
    """The MySQL error number that call() fails with (OperationalError only)."""
    with pytest.raises(pymysql.err.OperationalError) as failure:
        call()
    return failure.value.args[0]


def until_it_answers(call, errors, deadline=15.0):
    """call()'s result, calling it again until it answers, for `deadline` seconds at
    most; it may fail meanwhile, with OperationalError numbered in `errors` only."""
    end = time.monotonic() + deadline
    while True:
        try:
            return call()
        except pymysql.err.OperationalError as exc:
            assert exc.args[0] in errors, exc
            if time.monotonic() > end:
                raise
        time.sleep(0.02)


def wait_for(condition, what, deadline=15.0):
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, 'timed out waiting for ' + what
        time.sleep(0.02)


def refused(address):
    """Whether a new connection fails now, as in an outage."""
    try:
        connect(address).close()
        return False
    except pymysql.err.OperationalError as exc:
        return exc.args[0] in (LOST, REFUSED)


def test_survives_a_restart(counter, proxy):
    """proxy.down(), as a stopped server: the listener closes (connects are refused)
    and the live connections die.  The service is idle meanwhile: its first call
    after the restart must work (the pool's connection died unseen)."""
    live = connect(proxy.address)           # a connection open when the server stops
    before = counter.hit('home')            # ... and the pool's, idle now
    try:
        with proxy.down():
            assert code(lambda: query(live)) == LOST
            assert code(lambda: connect(proxy.address)) == REFUSED
    finally:
        close(live)
    assert counter.hit('home') == before + 1    # back, same data


def test_fails_at_once_while_down(counter, proxy):
    """While the server is down, the service fails with the driver's error, at once
    (not a hang), and works as soon as it is back."""
    before = counter.hit('home')
    with proxy.down():
        assert code(lambda: counter.hit('home')) in (LOST, REFUSED)
        assert code(lambda: counter.hit('home')) == REFUSED
    assert counter.hit('home') == before + 1


def test_survives_a_restart_that_refuses_its_first_connections(counter, proxy):
    """transient, protocol mysql: the first `count` connections get MySQL's own ERR
    packet, 1040 Too many connections, as from a server starting up or overloaded.
    transient keeps connections opened before it was set: down() kills them."""
    before = counter.hit('home')
    with proxy.with_handler('transient', count=2, protocol='mysql'):
        with proxy.down():                  # stopped: the pool's connection dies
            assert code(lambda: counter.hit('home')) in (LOST, REFUSED)
        # back, but refusing: the first 2 connections get the server's error
        with pytest.raises(pymysql.err.OperationalError) as failure:
            connect(proxy.address)
        assert failure.value.args == (TOO_MANY, 'Too many connections')
        assert code(lambda: counter.hit('home')) == TOO_MANY
        assert counter.hit('home') == before + 1    # the third connection passes


def test_survives_a_flapping_server(counter, proxy):
    """flap, mode refuse: 0.5 s up, 0.5 s down (connects refused), over and over.
    flap keeps connections opened while up, so the restart that begins the
    flapping kills them with down()."""
    counter.hit('home')
    with proxy.with_handler('flap', up=0.5, down=0.5, mode='refuse'):
        with proxy.down():
            pass
        hits = until_it_answers(lambda: counter.hit('home'), (LOST, REFUSED))
        live = until_it_answers(lambda: connect(proxy.address), (LOST, REFUSED))
        try:
            wait_for(lambda: refused(proxy.address), 'an outage')
            # live connections pass through the outage, the pool's too
            assert query(live) == 1
            assert counter.hit('home') == hits + 1
        finally:
            close(live)
    assert counter.hit('home') == hits + 2


def test_survives_a_real_restart(counter, proxy, mariadb):
    """For comparison, the real thing: the MariaDB server itself restarted behind the
    proxy (normal: it relays).  A connect through the proxy while the server is
    down is accepted, then closed, so the driver reports a lost connection
    rather than a refused one: down() is closer to a stopped server."""
    before = counter.hit('home')
    mariadb.stop()
    try:
        assert code(lambda: counter.hit('home')) in (LOST, REFUSED)
        assert code(lambda: connect(proxy.address)) == LOST
    finally:
        mariadb.start()
    assert counter.hit('home') == before + 1
