#!/usr/bin/env python3
"""Vaurien's benchmark: what the proxy costs, next to a direct connection.

    python3 bench/bench.py                  # the full run, 2 to 3 minutes
    python3 bench/bench.py --quick          # small sizes: a smoke test, under 30 s
    python3 bench/bench.py --only bulk --only delay

Everything runs on 127.0.0.1, on ephemeral ports, with the standard library.
The backends are in this file: an echo, a sink and a source server, driven by
one selector in a child process, so that they never share the load
generator's interpreter.  Each workload runs against the backend directly,
then through each relay in turn: Vaurien as a ``python3 vaurien.py``
subprocess (its memory and CPU are its own), and socat, haproxy and
toxiproxy-server when they are installed.  When redis-server and
redis-benchmark are installed, a C client adds round-trip rows against a
redis-server behind the same relays.

The workloads: bulk throughput one way or the other on one stream (upload:
client to server; download: server to client); echo round trips of 64 bytes
on 1 connection and on 50 at once; new connections per second (connect, one
round trip, close); and connections held open at once, each checked to echo.

Reading the table: "direct" is the absolute figure of the client against the
backend itself.  Each relay's column is the relay's figure divided by the
direct one measured in the same run: 1.00 means the relay costs nothing, 0.50
that it halves the throughput or the rate.  "target" is Vaurien's goal for its
ratio, "met" says whether this run reached it.  On a small machine the
client, the backend and the relay share the CPUs: the ratios compare relays
run under the same load, not relays on hosts of their own.

Below the table come Vaurien's own figures, each with its target: start-up
time, control API latency, the accuracy of the ``delay`` and ``bandwidth``
handlers, and its memory per held connection.  No figure fails the run: the
exit status is 0 unless the benchmark itself crashes.  What went wrong (lost
or wrong bytes, hangs, what a relay logged) is listed last.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAURIEN = os.path.join(ROOT, 'vaurien.py')
sys.path.insert(0, ROOT)
import vaurien  # noqa: E402  (the module under test, beside bench/)

HOST = '127.0.0.1'
MESSAGE = 64             # bytes per echo round trip
BLOCK = 1 << 20          # bytes per bulk send and receive
IO_TIMEOUT = 10          # seconds a client socket waits on connect, send or recv
START_TIMEOUT = 10.0     # seconds a relay gets to accept connections
HOLD_TIMEOUT = 60.0      # seconds the held connections get to echo
MAX_CONNECTIONS = 6000   # haproxy's maxconn: above the connections held at once
DELAY = 0.05             # seconds of the delay handler measured
RATE = 1_000_000         # bytes per second of the bandwidth handler measured
RELAY_TOOLS = {'socat': 'socat', 'haproxy': 'haproxy', 'toxiproxy': 'toxiproxy-server'}
READY = re.compile(r'Vaurien ready: proxy (\S+) -> \S+, control http://(\S+);')


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one run."""

    bulk_bytes: int       # bytes per bulk transfer...
    bulk_seconds: float   # ...unless it takes longer than this
    seconds: float        # duration of each measured rate
    connections: int      # connections doing round trips at once
    concurrent: int       # connections held open at once
    redis_requests: int   # requests per redis-benchmark run with 50 clients
    repeats: int          # samples of each start-up and control API figure
    delay_samples: int    # round trips timed through the delay handler
    bandwidth_bytes: int  # bytes downloaded through the bandwidth handler


FULL = Scale(bulk_bytes=400 * 10**6, bulk_seconds=10, seconds=2.0, connections=50,
             concurrent=5000, redis_requests=50000, repeats=20, delay_samples=30,
             bandwidth_bytes=3 * RATE)
QUICK = Scale(bulk_bytes=40 * 10**6, bulk_seconds=3, seconds=0.5, connections=50,
              concurrent=300, redis_requests=5000, repeats=5, delay_samples=8,
              bandwidth_bytes=RATE)


class Mismatch(Exception):
    """A relay lost, added or changed bytes."""


class RelayError(Exception):
    """A relay or backend could not be started."""


class Relay(NamedTuple):
    """Where a workload connects, and the process whose RSS is the relay's own."""

    address: tuple
    pid: int = None       # None: direct, or socat (one process per connection)
    control: tuple = None  # Vaurien's control API


class Measured(NamedTuple):
    value: float
    note: str = ''


class Figure(NamedTuple):
    """One of Vaurien's own figures, below the table."""

    label: str
    value: str
    target: str = ''
    met: bool = None


# ---------------------------------------------------------------------------
# Backends: echo, sink and source, one selector, in a child process
# ---------------------------------------------------------------------------

class Peer:
    """One connection accepted by a backend; `on_event` runs when it is ready."""

    def __init__(self, sock, selector):
        self.sock, self.selector = sock, selector
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self)

    def close(self):
        self.selector.unregister(self.sock)
        self.sock.close()

    def want(self, events):
        self.selector.modify(self.sock, events, self)


class Echo(Peer):
    """Sends back every byte; stops reading while its answer waits to be sent."""

    pending = b''

    def on_event(self, mask):
        if mask & selectors.EVENT_READ:
            data = self.sock.recv(65536)
            if not data:
                return self.close()
            self.pending += data
        self.pending = self.pending[self.sock.send(self.pending):]
        self.want(selectors.EVENT_WRITE if self.pending else selectors.EVENT_READ)


class Sink(Peer):
    """Counts what arrives; at EOF answers the count (8 bytes) and closes."""

    count = 0
    buffer = bytearray(BLOCK)

    def on_event(self, mask):
        received = self.sock.recv_into(self.buffer)
        self.count += received
        if not received:
            self.sock.send(struct.pack('!Q', self.count))
            self.close()


class Source(Peer):
    """Reads a size (8 bytes), sends that many bytes, then closes."""

    header = b''
    remaining = None
    block = memoryview(bytes(range(256)) * (BLOCK // 256))

    def on_event(self, mask):
        if self.remaining is None:
            self.header += self.sock.recv(8 - len(self.header))
            if len(self.header) == 8:
                (self.remaining,) = struct.unpack('!Q', self.header)
                self.want(selectors.EVENT_WRITE)
            return
        self.remaining -= self.sock.send(self.block[:min(BLOCK, self.remaining)])
        if not self.remaining:
            self.close()


BACKENDS = {'echo': Echo, 'sink': Sink, 'source': Source}


def serve_backends(listeners):
    """The child process: accept on every listener and serve, until terminated."""
    selector = selectors.DefaultSelector()
    for kind, listener in listeners.items():
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, BACKENDS[kind])
    while True:
        for key, mask in selector.select():
            if isinstance(key.data, type):
                accept_all(key.fileobj, key.data, selector)
                continue
            try:
                key.data.on_event(mask)
            except OSError:    # the client left early (reset, broken pipe)
                key.data.close()


def accept_all(listener, kind, selector):
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        kind(sock, selector)


@contextlib.contextmanager
def backends():
    """Start the backends in a forked child; yield {kind: port}; terminate it."""
    listeners = {kind: listen() for kind in BACKENDS}
    ports = {kind: sock.getsockname()[1] for kind, sock in listeners.items()}
    child = multiprocessing.get_context('fork').Process(
        target=serve_backends, args=(listeners,), name='bench-backends', daemon=True)
    child.start()
    for sock in listeners.values():
        sock.close()
    try:
        yield ports
    finally:
        child.terminate()
        child.join(5)


def listen():
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(4096)
    return sock


@contextlib.contextmanager
def redis_backend():
    """A redis-server on a free port, for redis-benchmark; yield {'redis': port}."""
    port = free_port()
    with external('redis-server', ['redis-server', '--port', str(port), '--bind', HOST,
                                   '--save', '', '--appendonly', 'no'], port, []):
        yield {'redis': port}


# ---------------------------------------------------------------------------
# Relays: direct, Vaurien, socat, haproxy, toxiproxy
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def direct_relay(port, problems):
    yield Relay((HOST, port))


@contextlib.contextmanager
def vaurien_relay(port, problems):
    """``python3 vaurien.py`` in front of `port`, with its control API; what it logs
    beyond its ready line and the info lines goes to `problems`."""
    process = subprocess.Popen(
        [sys.executable, VAURIEN, '--local', '%s:0' % HOST, '--distant', '%s:%d' % (HOST, port),
         '--http', '--http-host', HOST, '--http-port', '0'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, errors='replace')
    lines, ready = [], []
    reader = threading.Thread(target=read_vaurien, args=(process.stderr, lines, ready),
                              name='bench-vaurien-stderr', daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not ready:
            raise RelayError('vaurien did not start: %s' % (' | '.join(lines) or 'no output'))
        proxy, control = ready[0]
        yield Relay(proxy, process.pid, control)
    finally:
        stop_process(process)
        reader.join(5)
        process.stderr.close()
        problems.extend('vaurien logged: ' + line for line in lines if ' INFO ' not in line)
        if process.returncode not in (0, -signal.SIGTERM):
            problems.append('vaurien exited with status %s' % process.returncode)


def read_vaurien(stream, lines, ready):
    """Keep Vaurien's stderr drained: its ready line's addresses go to `ready`."""
    for line in stream:
        match = READY.search(line)
        if match and not ready:
            ready.append((split_address(match[1]), split_address(match[2])))
        else:
            lines.append(line.rstrip())


def split_address(text):
    host, _, port = text.rpartition(':')
    return host.strip('[]'), int(port)


def stop_process(process):
    """Terminate, then kill if it does not exit in 5 seconds."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def socat_relay(port, problems):
    listen_port = free_port()
    with external('socat', ['socat', 'TCP-LISTEN:%d,bind=%s,reuseaddr,fork,backlog=1024'
                            % (listen_port, HOST), 'TCP:%s:%d' % (HOST, port)],
                  listen_port, problems):
        yield Relay((HOST, listen_port))


HAPROXY_CONFIG = '''\
global
    maxconn {maxconn}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen relay
    bind {host}:{listen}
    server backend {host}:{port}
'''


@contextlib.contextmanager
def haproxy_relay(port, problems):
    listen_port = free_port()
    with tempfile.TemporaryDirectory(prefix='vaurien-bench-') as folder:
        config = os.path.join(folder, 'haproxy.cfg')
        with open(config, 'w') as stream:
            stream.write(HAPROXY_CONFIG.format(maxconn=MAX_CONNECTIONS, host=HOST,
                                               listen=listen_port, port=port))
        with external('haproxy', ['haproxy', '-f', config, '-db'], listen_port,
                      problems) as process:
            yield Relay((HOST, listen_port), process.pid)


@contextlib.contextmanager
def toxiproxy_relay(port, problems):
    """toxiproxy-server, with one proxy created through its HTTP API."""
    api_port, listen_port = free_port(), free_port()
    with external('toxiproxy-server', ['toxiproxy-server', '-host', HOST, '-port',
                                       str(api_port)], api_port, problems) as process:
        body = json.dumps({'name': 'bench', 'listen': '%s:%d' % (HOST, listen_port),
                           'upstream': '%s:%d' % (HOST, port), 'enabled': True}).encode()
        request = urllib.request.Request('http://%s:%d/proxies' % (HOST, api_port), body,
                                         {'Content-Type': 'application/json'})
        urllib.request.urlopen(request, timeout=START_TIMEOUT).close()
        wait_accepting(listen_port, process)
        yield Relay((HOST, listen_port), process.pid)


@contextlib.contextmanager
def external(name, args, port, problems):
    """Run a tool in a session of its own until it accepts on `port`; yield its
    process; then end it with every child it forked.  What it printed on
    stderr goes to `problems`."""
    with tempfile.TemporaryFile('w+', errors='replace') as errors:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=errors, start_new_session=True)
        try:
            wait_accepting(port, process)
            yield process
        finally:
            stop_group(process)
            errors.seek(0)
            problems.extend('%s said: %s' % (name, line.rstrip())
                            for line in errors if line.strip())


def stop_group(process):
    """SIGTERM, then SIGKILL, the process group of a process started in its own session."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass


def free_port():
    """A port free now: binding port 0 and closing (fine for the external tools)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_accepting(port, process):
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RelayError('%s exited with status %s' % (process.args[0], process.returncode))
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RelayError('%s does not accept on port %d after %g s'
                                 % (process.args[0], port, START_TIMEOUT)) from None
            time.sleep(0.01)


RELAYS = {'direct': direct_relay, 'vaurien': vaurien_relay, 'socat': socat_relay,
          'haproxy': haproxy_relay, 'toxiproxy': toxiproxy_relay}


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------

def connect(address):
    """A blocking connection whose connect, sends and receives give up after
    IO_TIMEOUT: kernel timeouts, so no extra poll() per call as settimeout() costs."""
    sock = socket.socket()
    limit = struct.pack('ll', IO_TIMEOUT, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def recv_exactly(sock, size):
    data = b''
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Mismatch('connection closed after %d of %d bytes' % (len(data), size))
        data += chunk
    return data


def message(connection, number):
    """The 64 bytes of round trip `number` on `connection`: each one differs."""
    return struct.pack('!II', connection, number) * (MESSAGE // 8)


def round_trip(sock, connection, number):
    sent = message(connection, number)
    sock.sendall(sent)
    answer = recv_exactly(sock, MESSAGE)
    if answer != sent:
        raise Mismatch('connection %d, round trip %d: sent %r, got back %r'
                       % (connection, number, sent[:8], answer[:8]))


def ping_pong(socks, seconds, rounds):
    """Round trips on every socket at once, one message in flight on each, until
    `seconds` pass or each did `rounds`; return (round trips done, seconds)."""
    selector = selectors.DefaultSelector()
    start = time.perf_counter()
    deadline = start + seconds
    done = 0
    try:
        for index, sock in enumerate(socks):
            sock.sendall(message(index, 0))
            selector.register(sock, selectors.EVENT_READ, [index, 0, b''])
        while selector.get_map() and (now := time.perf_counter()) < deadline:
            for key, _ in selector.select(deadline - now):
                done += echoed(selector, key, rounds)
    finally:
        selector.close()
    return done, time.perf_counter() - start


def echoed(selector, key, rounds):
    """Read what `key`'s socket answered: 1 when that completes a round trip
    (then start the next, or unregister the socket after `rounds`), else 0."""
    state = key.data   # [connection, round trip number, bytes received]
    chunk = key.fileobj.recv(MESSAGE - len(state[2]))
    if not chunk:
        raise Mismatch('connection %d closed before its echo' % state[0])
    state[2] += chunk
    if len(state[2]) < MESSAGE:
        return 0
    if state[2] != message(state[0], state[1]):
        raise Mismatch('connection %d, round trip %d: wrong echo %r'
                       % (state[0], state[1], state[2][:8]))
    state[1] += 1
    state[2] = b''
    if state[1] < rounds:
        key.fileobj.sendall(message(state[0], state[1]))
    else:
        selector.unregister(key.fileobj)
    return 1
