"""What happens if the MySQL server is restarted?  A pooled service that survives it.

HitCounter counts the hits of each page in MySQL or MariaDB (PyMySQL),
through a small pool of connections.  A restart kills the pool's idle
connections: the next query on one fails ("Lost connection to MySQL server
during query", 2013), and every later call on that connection object fails
too (InterfaceError (0, '')).  So:

- Pool checks each connection it hands out with ping(), replaces one that
  the server dropped with a new one, and never takes back a connection that
  failed.  While the server is down, calls fail at once with the
  driver's error (OperationalError); as soon as it is back, they work again,
  without restarting the application.
- NaivePool, the broken version, has neither: after the first restart, its
  dead connection fails every call, forever.

examples/test_mysql_restart.py proves both, through Vaurien, against a real
MariaDB.  Watch it by hand: python3 examples/mysql_restart.py [--naive]
HOST:PORT [USER], then restart the server.
"""
import contextlib
import os
import sys
import threading
import time

import pymysql

SCHEMA = 'CREATE TABLE IF NOT EXISTS hits (page VARCHAR(100) PRIMARY KEY, n INT NOT NULL)'


class Pool:
    """Up to `size` idle PyMySQL connections, each checked before it is handed out."""

    def __init__(self, host, port, size=4, **options):
        self.options = dict(host=host, port=port, connect_timeout=5, read_timeout=5,
                            write_timeout=5, autocommit=True, **options)
        self.size = size
        self.idle = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self):
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        if conn is not None:
            try:
                conn.ping(reconnect=False)  # the server may have dropped it meanwhile
            except pymysql.err.Error:
                self.discard(conn)
                conn = None
        try:
            if conn is None:
                conn = pymysql.connect(**self.options)
            yield conn
        except BaseException:
            self.discard(conn)              # failed: never handed out again
            raise
        self.give_back(conn)

    def give_back(self, conn):
        with self.lock:
            if len(self.idle) < self.size:
                self.idle.append(conn)
                return
        self.discard(conn)

    @staticmethod
    def discard(conn):
        if conn is not None:
            with contextlib.suppress(Exception):   # closing a dead one fails: never mind
                conn.close()

    def close(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            self.discard(conn)


class NaivePool(Pool):
    """The broken version: connections are neither checked nor thrown away."""

    @contextlib.contextmanager
    def connection(self):
        with self.lock:
            conn = self.idle.pop() if self.idle else pymysql.connect(**self.options)
        try:
            yield conn
        finally:
            self.give_back(conn)


class HitCounter:
    """The service: hit(page) counts one more hit of `page` and returns its count."""

    def __init__(self, pool):
        self.pool = pool

    def hit(self, page):
        with self.pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute('INSERT INTO hits (page, n) VALUES (%s, 1) '
                           'ON DUPLICATE KEY UPDATE n = n + 1', (page,))
            cursor.execute('SELECT n FROM hits WHERE page = %s', (page,))
            return cursor.fetchone()[0]


def main(argv):
    naive = '--naive' in argv
    args = [arg for arg in argv if arg != '--naive']
    if not args:
        sys.exit('usage: mysql_restart.py [--naive] HOST:PORT [USER]  (password: $MYSQL_PWD)')
    host, port = args[0].rsplit(':', 1)
    options = dict(user=args[1] if len(args) > 1 else 'root',
                   password=os.environ.get('MYSQL_PWD', ''))
    with contextlib.closing(pymysql.connect(host=host, port=int(port), **options)) as conn:
        conn.cursor().execute('CREATE DATABASE IF NOT EXISTS vaurien_demo')
        conn.select_db('vaurien_demo')
        conn.cursor().execute(SCHEMA)
    counter = HitCounter((NaivePool if naive else Pool)(host, int(port), database='vaurien_demo',
                                                        **options))
    while True:   # a hit a second: restart the server meanwhile
        try:
            print('hits:', counter.hit('home'))
        except pymysql.err.Error as exc:
            print('failed:', exc)
        time.sleep(1)


if __name__ == '__main__':
    main(sys.argv[1:])
