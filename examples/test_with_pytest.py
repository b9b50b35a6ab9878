# Vaurien in a pytest suite: an in-process proxy in front of a small HTTP
# backend, both on ephemeral loopback ports.  From the repository root:
#
#     python -m pytest examples/test_with_pytest.py -q
#
# Copy the two fixtures into your conftest.py, point `distant` at your own
# backend (Redis, MySQL...), and your application at proxy.address.
import http.client
import http.server
import os
import socket
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import vaurien  # noqa: E402


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        body = b'hello from %s\n' % self.path.encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def backend():
    """A tiny HTTP server on an ephemeral port: its (host, port)."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(backend):
    """A Vaurien proxy in this process, in front of `backend`, on an ephemeral port."""
    with vaurien.Proxy('127.0.0.1:0', '%s:%d' % backend) as proxy:
        yield proxy


def get(address, path='/', timeout=10):
    """(status, body, seconds) of one GET, on a fresh connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request('GET', path)
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        conn.close()


def test_normal_relays(proxy):
    status, body, _ = get(proxy.address, '/items')
    assert (status, body) == (200, b'hello from /items\n')


def test_errors_then_recovery(proxy):
    with proxy.with_handler('errors'):
        status, body, _ = get(proxy.address)
        assert status == 503
    # back to normal: the client survived and the next call works
    assert get(proxy.address)[0] == 200


def test_delay_makes_calls_slower(proxy):
    with proxy.with_handler('delay', sleep=0.3):
        status, _, seconds = get(proxy.address)
    assert status == 200
    assert seconds >= 0.3


def test_client_times_out_on_hang(proxy):
    with proxy.with_handler('hang'):
        with pytest.raises(socket.timeout):  # TimeoutError only from 3.10
            get(proxy.address, timeout=0.3)
    assert get(proxy.address)[0] == 200


def test_custom_handler(backend):
    """examples/custom_handler.py's shout, added to the built-in handlers: replies are
    upper-cased (examples/custom.ini wires the same one in from an ini file)."""
    from custom_handler import shout       # beside this file
    with vaurien.Proxy('127.0.0.1:0', '%s:%d' % backend, handlers={'shout': shout}) as proxy:
        with proxy.with_handler('shout'):
            status, body, _ = get(proxy.address, '/quiet')
        assert (status, body) == (200, b'HELLO FROM /QUIET\n')
        assert get(proxy.address, '/quiet')[1] == b'hello from /quiet\n'   # normal again
