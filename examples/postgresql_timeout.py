"""Are you sending back the right 503s when PostgreSQL times out?

A WSGI app answers GET /answer by asking PostgreSQL (pg8000) what 6 * 7 is.
When PostgreSQL is slow, hung, or refuses connections, the right answer is
a prompt 503 Service Unavailable with Retry-After - what load balancers and
clients know to retry later or elsewhere - not a 500 (a bug, to them), and
not a request that hangs until the client gives up.  So App:

- gives every PostgreSQL connection a socket timeout (TIMEOUT, half a
  second: far more than its query needs), so that a slow or hung server is
  an error in bounded time (a statement_timeout, set on the server, would
  also cancel slow queries with SQLSTATE 57014: a 503 as well);
- answers 503 to the network's errors (OSError: refused, reset, timed out;
  pg8000's InterfaceError) and to PostgreSQL's errors that mean "not now"
  (SQLSTATE classes 08, 53 and 57: connection failures, too many clients,
  starting up or shutting down, canceled); other errors are bugs: 500;
- never gives a connection that failed back to its pool: after a timeout,
  the answer may still be on its way, and would be read as the next one's.

BrokenApp, the broken version, catches nothing and is used without a
timeout: a slow PostgreSQL makes slow 200s, a hung one hung requests, a
refusing one 500s.

examples/test_postgresql_timeout.py proves both, through Vaurien, against a
real PostgreSQL.  Run it by hand: python3 examples/postgresql_timeout.py
[--broken] [HOST:PORT [USER]] (PostgreSQL's; password: $PGPASSWORD).
"""
import contextlib
import logging
import os
import sys
import threading
import wsgiref.simple_server
from socketserver import ThreadingMixIn

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

TIMEOUT = 0.5
UNAVAILABLE = ('08', '53', '57')   # SQLSTATE classes that mean "not now", not "a bug"

log = logging.getLogger('postgresql_timeout')


class Pool:
    """Up to `size` idle pg8000 connections; one that failed is thrown away."""

    def __init__(self, host, port, timeout=TIMEOUT, size=4, **options):
        self.options = dict(host=host, port=port, timeout=timeout, **options)
        self.size = size
        self.idle = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self):
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        try:
            if conn is None:
                conn = pg8000.native.Connection(**self.options)
            yield conn
        except BaseException:
            self.discard(conn)
            raise
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


def unavailable(exc):
    """Whether `exc` means that PostgreSQL cannot serve now (503), rather than a bug."""
    if isinstance(exc, DatabaseError):
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return fields.get('C', '')[:2] in UNAVAILABLE
    return isinstance(exc, (OSError, InterfaceError))


class App:
    """The WSGI app: GET /answer."""

    def __init__(self, pool):
        self.pool = pool

    def answer(self):
        with self.pool.connection() as conn:
            return conn.run('SELECT 6 * 7')[0][0]

    def respond(self):
        """(status, headers, body) of GET /answer."""
        try:
            answer = self.answer()
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.warning('PostgreSQL unavailable: %r', exc)
            return '503 Service Unavailable', [('Retry-After', '1')], b'try again later\n'
        return '200 OK', [], b'%d\n' % answer

    def __call__(self, environ, start_response):
        if environ['PATH_INFO'] != '/answer':
            status, headers, body = '404 Not Found', [], b'not found\n'
        else:
            status, headers, body = self.respond()
        start_response(status, headers + [('Content-Type', 'text/plain'),
                                          ('Content-Length', str(len(body)))])
        return [body]


class BrokenApp(App):
    """The broken version: nothing caught (use it with Pool(timeout=None))."""

    def respond(self):
        return '200 OK', [], b'%d\n' % self.answer()


class Server(ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """A thread per request; server_close() waits for them."""


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


def serve(app, host='127.0.0.1', port=0):
    """Serve `app` in a thread, on an ephemeral port by default; returns the server
    (server.server_address; stop it with shutdown() then server_close())."""
    server = wsgiref.simple_server.make_server(host, port, app, Server, QuietHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def main(argv):
    broken = '--broken' in argv
    args = [arg for arg in argv if arg != '--broken']
    host, port = (args[0] if args else '127.0.0.1:5432').rsplit(':', 1)
    pool = Pool(host, int(port), timeout=None if broken else TIMEOUT,
                user=args[1] if len(args) > 1 else 'postgres',
                password=os.environ.get('PGPASSWORD'))
    server = serve((BrokenApp if broken else App)(pool))
    print('try: curl -i http://%s:%d/answer  (Ctrl-C stops)' % server.server_address)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
        server.server_close()


if __name__ == '__main__':
    logging.basicConfig()
    main(sys.argv[1:])
