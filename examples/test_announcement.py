# The announcement's example, runnable.  From the repository root:
#
#     python -m unittest examples/test_announcement.py
#     python -m pytest examples/test_announcement.py
#
# start_proxy(port=8080) runs a proxy in a subprocess: it listens on
# localhost:8000 and relays to a backend on localhost:8080 (where its own
# control API listens too, by default).  Ports 8000 and 8080 must be free.
# Under the errors handler, an HTTP call through the proxy gets a 503,
# whatever the backend.
import http.client
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vaurien import Client, start_proxy, stop_proxy


def status_through_proxy(client):
    """The HTTP status of GET /proxy sent through the proxy that `client` drives."""
    host, port = client.status()['local'].rsplit(':', 1)
    conn = http.client.HTTPConnection(host.strip('[]'), int(port), timeout=10)
    try:
        conn.request('GET', '/proxy')
        return conn.getresponse().status
    finally:
        conn.close()


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
            self.assertEqual(status_through_proxy(client), 503)

        # we're back to normal here
        self.assertEqual(client.get_handler()['handler'], 'normal')
        self.assertFalse(client.get_handler()['fixed'])


if __name__ == '__main__':
    unittest.main()
