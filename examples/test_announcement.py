# The announcement's example, runnable.  From the repository root:
#
#     python -m unittest examples/test_announcement.py
#     python -m pytest examples/test_announcement.py
#
# start_proxy(port=8080) runs a proxy in a subprocess: it listens on
# localhost:8000 and relays to a backend on localhost:8080, and its control
# API listens on localhost:8080 too.  So the backend behind the proxy is the
# control API itself: a plain HTTP server that is always there.  The test is
# skipped when another program holds port 8000 or 8080.
import os
import socket
import sys
import http.client
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vaurien import Client, start_proxy, stop_proxy


def _ports_free(*ports):
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(('localhost', port))
            except OSError:
                return False
    return True


def _status_through_proxy():
    """GET /proxy through the proxy on localhost:8000: the HTTP status."""
    conn = http.client.HTTPConnection('localhost', 8000, timeout=10)
    try:
        conn.request('GET', '/proxy')
        return conn.getresponse().status
    finally:
        conn.close()


@unittest.skipUnless(_ports_free(8000, 8080), 'ports 8000 and 8080 must be free')
class MyTest(unittest.TestCase):

    def setUp(self):
        self.proxy_pid = start_proxy(port=8080)

    def tearDown(self):
        stop_proxy(self.proxy_pid)

    def test_one(self):
        client = Client()

        with client.with_handler('errors'):
            # do something...
            self.assertEqual(client.get_handler()['handler'], 'errors')
            self.assertEqual(_status_through_proxy(), 503)

        # we're back to normal here
        self.assertEqual(client.get_handler()['handler'], 'normal')
        self.assertEqual(_status_through_proxy(), 200)


if __name__ == '__main__':
    unittest.main()
