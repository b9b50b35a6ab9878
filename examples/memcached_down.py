"""Is your web application still working in degraded mode when memcached is down?

A WSGI app serves /profile/NAME, a page that takes a while to render
(render(): a tenth of a second, standing in for the database queries behind
it), cached in memcached.  When memcached is down, hangs or answers errors,
the page must still be served - 200, only slower: rendered each time - and
the cache used again, and refilled, as soon as memcached is back:

- Memcache, a tiny memcached client (text protocol: get and set), puts a
  timeout on every socket operation (a quarter of a second), and drops its
  connection after any failure: the next call opens a new one.
- App catches the cache's failures (OSError: refused, reset, timed out;
  CacheError: what memcached answered), and renders the page.  The
  X-Cache header says hit, miss or error.
- BrokenApp, the broken version, catches nothing (a 500 when memcached is
  down or answers errors), and runs with Memcache(timeout=None): a hung
  memcached hangs its requests.

examples/test_memcached_down.py proves both, through Vaurien, against a real
memcached.  Run it by hand: python3 examples/memcached_down.py [--broken]
[HOST:PORT] (memcached's, default 127.0.0.1:11211), and stop memcached.
"""
import re
import socket
import sys
import threading
import time
import wsgiref.simple_server
from socketserver import ThreadingMixIn

RENDER_SECONDS = 0.1
CACHE_SECONDS = 60


class CacheError(Exception):
    """memcached answered an error, or closed the connection."""


class Memcache:
    """A memcached client: get(key), set(key, value); one connection, reopened after a failure."""

    def __init__(self, address, timeout=0.25):
        self.address, self.timeout = address, timeout
        self.sock = self.file = None
        self.lock = threading.Lock()

    def get(self, key):
        """The bytes stored under `key`, or None."""
        def read():
            line = self.readline()              # VALUE key flags size, or END
            if line == b'END':
                return None
            value = self.file.read(int(line.split()[3]) + 2)[:-2]
            if self.readline() != b'END':
                raise CacheError('no END after the value')
            return value
        return self.call(b'get %s\r\n' % key, read)

    def set(self, key, value, ttl=0):
        request = b'set %s 0 %d %d\r\n%s\r\n' % (key, ttl, len(value), value)
        if self.call(request, self.readline) != b'STORED':
            raise CacheError('not stored')

    def call(self, request, read):
        with self.lock:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address, timeout=self.timeout)
                    self.file = self.sock.makefile('rb')
                self.sock.sendall(request)
                return read()
            except BaseException:
                self.close()   # refused, reset, timed out, or out of step: start afresh
                raise

    def readline(self):
        line = self.file.readline()
        if not line.endswith(b'\r\n'):
            raise CacheError('connection closed')
        if line.startswith((b'ERROR', b'CLIENT_ERROR', b'SERVER_ERROR')):
            raise CacheError(line.decode('ascii', 'replace').strip())
        return line[:-2]

    def close(self):
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = self.file = None


class App:
    """The WSGI app: GET /profile/NAME, from the cache when it can."""

    def __init__(self, cache):
        self.cache = cache
        self.renders = 0

    def render(self, name):
        """The slow part the cache saves."""
        self.renders += 1
        time.sleep(RENDER_SECONDS)
        return ('<h1>%s</h1>\n' % name).encode()

    def page(self, name):
        """(body, how the cache did: hit, miss or error)."""
        key = b'profile:' + name.encode()
        try:
            body = self.cache.get(key)
        except (OSError, CacheError):       # down, hung or failing: do without it
            return self.render(name), 'error'
        if body is not None:
            return body, 'hit'
        body = self.render(name)
        try:
            self.cache.set(key, body, CACHE_SECONDS)
        except (OSError, CacheError):
            return body, 'error'
        return body, 'miss'

    def __call__(self, environ, start_response):
        match = re.fullmatch(r'/profile/([a-z0-9_-]{1,50})', environ['PATH_INFO'])
        if not match:
            start_response('404 Not Found', [('Content-Type', 'text/plain')])
            return [b'not found\n']
        body, cache = self.page(match.group(1))
        start_response('200 OK', [('Content-Type', 'text/html'), ('X-Cache', cache),
                                  ('Content-Length', str(len(body)))])
        return [body]


class BrokenApp(App):
    """The broken version: the cache's failures are not caught (use it with timeout=None)."""

    def page(self, name):
        key = b'profile:' + name.encode()
        body = self.cache.get(key)
        if body is not None:
            return body, 'hit'
        body = self.render(name)
        self.cache.set(key, body, CACHE_SECONDS)
        return body, 'miss'


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
    host, port = (args[0] if args else '127.0.0.1:11211').rsplit(':', 1)
    cache = Memcache((host, int(port)), timeout=None if broken else 0.25)
    server = serve((BrokenApp if broken else App)(cache))
    print('try: curl -i http://%s:%d/profile/alice  (Ctrl-C stops)' % server.server_address)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
        server.server_close()


if __name__ == '__main__':
    main(sys.argv[1:])
