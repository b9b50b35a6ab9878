"""The bench's calibration: the least a Python relay with one selector loop does.

    python3 bench/minimal_relay.py LISTEN_PORT HOST PORT

It relays every connection accepted on HOST:LISTEN_PORT to HOST:PORT, in one
`selectors` loop, and does nothing else: no handler, no fault, no timer, no
count, a blocking connect.  Its column in bench.py's table is the ceiling a
Python relay reaches on the machine of the run: a target above it is out of
reach of Python there, whatever Vaurien does.  It is the "single-loop
calibration (70 lines)" of the issue that set the targets.
"""

import selectors
import socket
import sys

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class End:
    """One socket of a relayed pair: what waits to be written to it, and its EOF."""

    def __init__(self, selector, sock):
        self.selector, self.sock = selector, sock
        self.peer, self.pending, self.eof_read, self.watched = None, b'', False, 0
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def watch(self):
        """Read while nothing waits for the peer; write while something waits here."""
        events = (0 if self.eof_read or self.peer.pending else READ) | (
            WRITE if self.pending else 0)
        if events and self.watched:
            self.selector.modify(self.sock, events, self)
        elif events:
            self.selector.register(self.sock, events, self)
        elif self.watched:
            self.selector.unregister(self.sock)
        self.watched = events

    def close_pair(self):
        for end in (self, self.peer):
            if end.watched:
                end.selector.unregister(end.sock)
                end.watched = 0
            end.sock.close()

    def on_event(self, mask):
        if self.sock.fileno() < 0:    # its pair was closed earlier in this round
            return
        try:
            if mask & WRITE:
                self.flush()
            if mask & READ:
                self.read()
        except OSError:       # a reset, a broken pipe: both ends go
            self.close_pair()

    def flush(self):
        sent = self.sock.send(self.pending)
        self.pending = self.pending[sent:]
        if not self.pending and self.peer.eof_read:
            self.sock.shutdown(socket.SHUT_WR)
            if self.eof_read:
                return self.close_pair()
        self.peer.watch()
        self.watch()

    def read(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        peer = self.peer
        if not data:
            self.eof_read = True
            if peer.eof_read and not peer.pending and not self.pending:
                return self.close_pair()
            if not peer.pending:
                peer.sock.shutdown(socket.SHUT_WR)
            return self.watch()
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            peer.pending = data[sent:]
            peer.watch()
            self.watch()


def serve(listen_port, host, port):
    selector = selectors.DefaultSelector()
    listener = socket.create_server((host, listen_port), backlog=1024)
    listener.setblocking(False)
    selector.register(listener, READ)
    while True:
        for key, mask in selector.select():
            if key.data is not None:
                key.data.on_event(mask)
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            try:
                backend = socket.create_connection((host, port))
            except OSError:
                client.close()
                continue
            ends = End(selector, client), End(selector, backend)
            ends[0].peer, ends[1].peer = ends[1], ends[0]
            for end in ends:
                end.watch()


if __name__ == '__main__':
    try:
        serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    except KeyboardInterrupt:
        pass
