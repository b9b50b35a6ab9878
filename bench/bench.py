#!/usr/bin/env python3
"""Vaurien's benchmark: what the proxy costs, next to a direct connection.

    python3 bench/bench.py                  # the full run, 1 to 3 minutes
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
run under the same load, not relays on hosts of their own, and they move by
about 0.1 from one run to the next (more when something else runs: the load
average at the start is printed).

Below the table come Vaurien's own figures, each with its target: start-up
time, control API latency, the accuracy of the ``delay`` and ``bandwidth``
handlers, and its memory per held connection.  No figure fails the run: the
exit status is 0 unless the benchmark itself crashes.  What went wrong (lost
or wrong bytes, hangs, what a relay logged, a Vaurien slow to exit on
SIGTERM) is listed last.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import platform
import queue
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
STOP_GRACE = 30.0        # seconds Vaurien gets to exit after SIGTERM, before SIGKILL
SLOW_STOP = 1.0          # seconds to exit after SIGTERM beyond which it is a problem
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
    redis_requests: int   # requests per redis-benchmark run with 50 clients, half with 1
    starts: int           # samples of start_proxy()
    repeats: int          # samples of the other start-up and control API figures
    delay_samples: int    # round trips timed through the delay handler
    bandwidth_bytes: int  # bytes downloaded through the bandwidth handler


FULL = Scale(bulk_bytes=400 * 10**6, bulk_seconds=10, seconds=2.0, connections=50,
             concurrent=5000, redis_requests=50000, starts=5, repeats=20, delay_samples=30,
             bandwidth_bytes=3 * RATE)
QUICK = Scale(bulk_bytes=40 * 10**6, bulk_seconds=3, seconds=0.5, connections=50,
              concurrent=300, redis_requests=10000, starts=2, repeats=5, delay_samples=8,
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
    """A workload's figure through one relay."""

    value: float
    note: str = ''
    memory: tuple = None   # (MB resident with the connections held, KB per connection)


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
    buffer = bytearray(BLOCK)   # shared: the backends run in one thread

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
            if isinstance(key.data, type):   # a listener, with the Peer class it serves
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
def redis_backend(problems):
    """A redis-server on a free port, for redis-benchmark; yield {'redis': port}."""
    port = free_port()
    with external('redis-server', ['redis-server', '--port', str(port), '--bind', HOST,
                                   '--save', '', '--appendonly', 'no'], port, problems):
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
    lines, ready = [], queue.Queue()
    reader = threading.Thread(target=read_vaurien, args=(process.stderr, lines, ready),
                              name='bench-vaurien-stderr', daemon=True)
    reader.start()
    try:
        try:
            addresses = ready.get(timeout=START_TIMEOUT)
        except queue.Empty:
            addresses = None
        if addresses is None:
            raise RelayError('vaurien did not start: %s' % (' | '.join(lines) or 'no output'))
        yield Relay(addresses[0], process.pid, addresses[1])
    finally:
        took = stop_process(process, STOP_GRACE)
        reader.join(5)
        process.stderr.close()
        problems.extend('vaurien logged: ' + line for line in lines if ' INFO ' not in line)
        if took is None:
            problems.append('vaurien did not exit within %g s of SIGTERM: killed' % STOP_GRACE)
        elif took > SLOW_STOP:
            problems.append('vaurien took %.1f s to exit after SIGTERM' % took)
        elif process.returncode not in (0, -signal.SIGTERM):
            problems.append('vaurien exited with status %s' % process.returncode)


def read_vaurien(stream, lines, ready):
    """Keep Vaurien's stderr drained: put its proxy and control addresses on
    `ready` when it announces them (None if it exits first), its other lines
    in `lines`."""
    announced = False
    for line in stream:
        match = None if announced else READY.search(line)
        if match:
            ready.put((split_address(match[1]), split_address(match[2])))
            announced = True
        else:
            lines.append(line.rstrip())
    if not announced:
        ready.put(None)


def split_address(text):
    host, _, port = text.rpartition(':')
    return host.strip('[]'), int(port)


def stop_process(process, grace):
    """Terminate, then kill if it is still there after `grace` seconds: return
    the seconds it took to exit, or None when it had to be killed."""
    start = time.perf_counter()
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None
    return time.perf_counter() - start


@contextlib.contextmanager
def socat_relay(port, problems):
    """socat, forking a process per connection; a listen queue of 1024 as
    Vaurien's, where socat's 5 would drop the SYNs of a burst of connects."""
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


def round_trip_times(address, count):
    """Seconds of each of `count` round trips on one connection, after a first one."""
    times = []
    with connect(address) as sock:
        round_trip(sock, 0, 0)
        for number in range(1, count + 1):
            start = time.perf_counter()
            round_trip(sock, 0, number)
            times.append(time.perf_counter() - start)
    return times


def rss_mb(pid):
    """The resident memory of process `pid` in MB (VmRSS), or None without a pid."""
    if pid is None:
        return None
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return None


# ---------------------------------------------------------------------------
# The table's workloads: measure(relay, scale) -> Measured
# ---------------------------------------------------------------------------

def bulk_upload(relay, scale):
    """Send to the sink, then half-close: the sink answers the byte count it got."""
    block = memoryview(bytes(BLOCK))
    sent = 0
    with connect(relay.address) as sock:
        start = time.perf_counter()
        deadline = start + scale.bulk_seconds
        while sent < scale.bulk_bytes and time.perf_counter() < deadline:
            sock.sendall(block)
            sent += BLOCK
        sock.shutdown(socket.SHUT_WR)
        (arrived,) = struct.unpack('!Q', recv_exactly(sock, 8))
        elapsed = time.perf_counter() - start
    if arrived != sent:
        raise Mismatch('%d bytes sent, the sink received %d' % (sent, arrived))
    return Measured(arrived / elapsed / 1e6, cap_note(sent, scale))


def bulk_download(relay, scale):
    """Ask the source for the bulk size and read it, or what comes before the cap."""
    buffer = bytearray(BLOCK)
    received = 0
    with connect(relay.address) as sock:
        start = time.perf_counter()
        deadline = start + scale.bulk_seconds
        sock.sendall(struct.pack('!Q', scale.bulk_bytes))
        while received < scale.bulk_bytes and time.perf_counter() < deadline:
            count = sock.recv_into(buffer)
            if not count:
                raise Mismatch('EOF after %d of %d bytes' % (received, scale.bulk_bytes))
            received += count
        elapsed = time.perf_counter() - start
        if received == scale.bulk_bytes and sock.recv(1):
            raise Mismatch('more than the %d bytes the source sent' % received)
    return Measured(received / elapsed / 1e6, cap_note(received, scale))


def cap_note(moved, scale):
    if moved >= scale.bulk_bytes:
        return ''
    return 'stopped at the %g s cap, after %d MB' % (scale.bulk_seconds, moved // 10**6)


def round_trips(relay, scale):
    """Echo round trips, one after the other, on one connection."""
    count = 0
    with connect(relay.address) as sock:
        start = time.perf_counter()
        deadline = start + scale.seconds
        while time.perf_counter() < deadline:
            round_trip(sock, 0, count)
            count += 1
        return Measured(count / (time.perf_counter() - start))


def concurrent_round_trips(relay, scale):
    """Echo round trips on `scale.connections` connections at once, from one selector."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(relay.address)) for _ in range(scale.connections)]
        done, elapsed = ping_pong(socks, scale.seconds, float('inf'))
    return Measured(done / elapsed)


def redis_ping(relay, scale, clients):
    """redis-benchmark's PING (RESP bulk) against redis-server, with `clients` connections."""
    requests = scale.redis_requests if clients > 1 else scale.redis_requests // 2
    result = subprocess.run(
        ['redis-benchmark', '-h', relay.address[0], '-p', str(relay.address[1]),
         '-c', str(clients), '-n', str(requests), '-t', 'ping_mbulk', '--csv'],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=True)
    for line in result.stdout.splitlines():
        fields = [field.strip('"') for field in line.split(',')]
        if fields[0] == 'PING_MBULK':
            return Measured(float(fields[1]))
    raise RelayError('redis-benchmark printed no result: %s' % (result.stdout + result.stderr))


def new_connections(relay, scale):
    """Connect, one round trip, close; again and again, on one thread."""
    count = 0
    start = time.perf_counter()
    deadline = start + scale.seconds
    while time.perf_counter() < deadline:
        with connect(relay.address) as sock:
            round_trip(sock, count, 0)
        count += 1
    return Measured(count / (time.perf_counter() - start))


def held_connections(relay, scale):
    """Open `scale.concurrent` connections, then, all of them open, a round trip
    on each at once; the value is the number that echoed correctly."""
    idle = rss_mb(relay.pid)
    with contextlib.ExitStack() as stack:
        start = time.perf_counter()
        socks, failure = open_many(stack, relay.address, scale.concurrent)
        opened = time.perf_counter() - start
        echoed, echoing = ping_pong(socks, HOLD_TIMEOUT, rounds=1)
        held = rss_mb(relay.pid)
    notes = ['%d opened in %.1f s, echoed in %.1f s' % (len(socks), opened, echoing)]
    if failure is not None:
        notes.append('opening stopped: %s' % describe(failure))
    if echoed < len(socks):
        notes.append('%d did not echo within %g s' % (len(socks) - echoed, HOLD_TIMEOUT))
    memory = None
    if held is not None:
        memory = (held, (held - idle) * 1024 / max(1, len(socks)))
        notes.append('RSS %.1f MB held, %.1f MB idle: %.1f KB per connection'
                     % (held, idle, memory[1]))
    return Measured(echoed, ', '.join(notes), memory)


def open_many(stack, address, count):
    """Open up to `count` connections, closed with `stack`: (sockets, error that stopped it)."""
    socks = []
    try:
        while len(socks) < count:
            socks.append(stack.enter_context(connect(address)))
    except OSError as exc:
        return socks, exc
    return socks, None


class Workload(NamedTuple):
    group: str        # its --only name
    label: str
    unit: str
    backend: str      # the backend the relays stand in front of
    measure: object   # measure(relay, scale) -> Measured
    target: float     # Vaurien's target ratio


def workloads(scale):
    size = '%d MB' % (scale.bulk_bytes // 10**6)
    many = '%d conns' % scale.connections
    return [
        Workload('bulk', 'bulk upload, 1 stream, ' + size, 'MB/s', 'sink', bulk_upload, 0.50),
        Workload('bulk', 'bulk download, 1 stream, ' + size, 'MB/s', 'source', bulk_download,
                 0.50),
        Workload('roundtrip', 'echo 64 B round trips, 1 conn', 'rt/s', 'echo', round_trips,
                 0.65),
        Workload('roundtrip', 'echo 64 B round trips, ' + many, 'rt/s', 'echo',
                 concurrent_round_trips, 0.35),
        Workload('redis', 'redis-benchmark PING, 1 conn', 'rt/s', 'redis',
                 functools.partial(redis_ping, clients=1), 0.65),
        Workload('redis', 'redis-benchmark PING, 50 conns', 'rt/s', 'redis',
                 functools.partial(redis_ping, clients=50), 0.35),
        Workload('connect', 'new conns: connect, 1 round trip, close', 'conn/s', 'echo',
                 new_connections, 0.15),
        Workload('concurrent', '%d conns held open, each echoing' % scale.concurrent, 'conns',
                 'echo', held_connections, 1.0),
    ]


FAILURES = (OSError, Mismatch, RelayError, subprocess.SubprocessError, vaurien.VaurienError)


def describe(exc):
    if isinstance(exc, BlockingIOError):
        return 'no answer within %d s' % IO_TIMEOUT
    return '%s: %s' % (type(exc).__name__, exc)


def run_table(selected, relays, ports, scale, problems):
    """Each workload, direct and through each relay: [(Workload, {relay: Measured or None})]."""
    return [(workload, {kind: measure_cell(workload, kind, ports[workload.backend], scale,
                                           problems) for kind in relays})
            for workload in selected]


def measure_cell(workload, kind, port, scale, problems):
    """One workload through one relay; None, and a problem, when it fails."""
    with tagged(problems, '%s, %s' % (workload.label, kind)):
        try:
            with RELAYS[kind](port, problems) as relay:
                result = workload.measure(relay, scale)
        except FAILURES as exc:
            problems.append(describe(exc))
            result = None
    progress('%s, %s: %s' % (workload.label, kind, absolute(result, workload.unit)))
    return result


@contextlib.contextmanager
def tagged(problems, tag):
    """Prefix with `tag` the problems added to `problems` in the block."""
    start = len(problems)
    try:
        yield
    finally:
        problems[start:] = ['%s: %s' % (tag, problem) for problem in problems[start:]]


# ---------------------------------------------------------------------------
# Vaurien's own figures: make(ports, scale, problems) -> [Figure]
# ---------------------------------------------------------------------------

def startup_figures(ports, scale, problems):
    """start_proxy() until ready, and an in-process Proxy(...).start()."""
    distant = '%s:%d' % (HOST, ports['echo'])
    subprocesses = [time_start_proxy(distant) for _ in range(scale.starts)]
    in_process = [time_in_process_proxy((HOST, ports['echo'])) for _ in range(scale.repeats)]
    return [
        Figure('start_proxy() until ready', summary(subprocesses, 1, 's', 3), '<= 0.3 s',
               statistics.median(subprocesses) <= 0.3),
        Figure('in-process Proxy(...).start() until ready', summary(in_process, 1000, 'ms'),
               '<= 20 ms', statistics.median(in_process) <= 0.020),
    ]


def time_start_proxy(distant):
    start = time.perf_counter()
    pid = vaurien.start_proxy(local='%s:0' % HOST, distant=distant, http_host=HOST,
                              http_port=0)
    elapsed = time.perf_counter() - start
    vaurien.stop_proxy(pid)
    return elapsed


def time_in_process_proxy(distant):
    """Seconds to start an in-process proxy; one round trip through it proves it ready."""
    start = time.perf_counter()
    proxy = vaurien.Proxy('%s:0' % HOST, distant).start()
    elapsed = time.perf_counter() - start
    try:
        with connect(proxy.address) as sock:
            round_trip(sock, 0, 0)
    finally:
        proxy.stop()
    return elapsed


def switch_figures(ports, scale, problems):
    """Control API latency, seen by a Client, on a `python3 vaurien.py` subprocess."""
    calls = scale.repeats * 5
    with vaurien_relay(ports['echo'], problems) as relay:
        with contextlib.closing(vaurien.Client(*relay.control)) as client:
            switches = [timed(client.set_handler, 'delay' if number % 2 else 'normal')
                        for number in range(calls)]
            scoped = [timed(enter_and_exit, client) for _ in range(calls)]
    return [
        Figure('handler switch, Client.set_handler', summary(switches, 1000, 'ms'),
               '<= 2 ms', statistics.median(switches) <= 0.002),
        Figure('Client.with_handler, enter + exit (3 calls)', summary(scoped, 1000, 'ms')),
    ]


def enter_and_exit(client):
    with client.with_handler('delay', sleep=DELAY):
        pass


def timed(function, *args, **keywords):
    start = time.perf_counter()
    function(*args, **keywords)
    return time.perf_counter() - start


def delay_figures(ports, scale, problems):
    """Round trips through `delay`, less the direct round trip and the delay."""
    direct = statistics.median(round_trip_times((HOST, ports['echo']), scale.delay_samples))
    with vaurien_relay(ports['echo'], problems) as relay:
        with contextlib.closing(vaurien.Client(*relay.control)) as client:
            client.set_handler('delay', sleep=DELAY)
        delayed = round_trip_times(relay.address, scale.delay_samples)
    errors = [(seconds - direct - DELAY) * 1000 for seconds in delayed]
    return [Figure('delay %g ms: round trip - direct - %g ms' % (DELAY * 1000, DELAY * 1000),
                   '%.2f ms median, %.2f ms max' % (statistics.median(errors), max(errors)),
                   'within 5 ms', max(abs(error) for error in errors) <= 5)]


def bandwidth_figures(ports, scale, problems):
    """The slope of bytes received over time through `bandwidth`, over its rate."""
    with vaurien_relay(ports['source'], problems) as relay:
        with contextlib.closing(vaurien.Client(*relay.control)) as client:
            client.set_handler('bandwidth', rate=RATE, direction='to_client')
        moments, totals = download_progress(relay.address, scale.bandwidth_bytes)
    mean_t, mean_b = statistics.fmean(moments), statistics.fmean(totals)
    rate = (sum((t - mean_t) * (b - mean_b) for t, b in zip(moments, totals))
            / sum((t - mean_t) ** 2 for t in moments))   # least squares; linear_regression is 3.10+
    return [Figure('bandwidth %s B/s to_client: observed / configured' % format(RATE, ','),
                   '%.3f (%s B/s)' % (rate / RATE, format(round(rate), ',')), '1.00 ideal')]


def download_progress(address, size):
    """Download `size` bytes from the source: the moments of each receive, and
    the bytes received by then."""
    moments, totals, received = [], [], 0
    with connect(address) as sock:
        sock.sendall(struct.pack('!Q', size))
        while received < size:
            count = len(sock.recv(BLOCK))
            if not count:
                raise Mismatch('EOF after %d of %d bytes' % (received, size))
            received += count
            moments.append(time.perf_counter())
            totals.append(received)
    return moments, totals


def memory_figures(rows):
    """Vaurien's RSS with the connections held, from the held-connections row."""
    figures = []
    for workload, cells in rows:
        cell = cells.get('vaurien')
        if workload.measure is held_connections and cell and cell.memory:
            held, per_connection = cell.memory
            figures.append(Figure('RSS with %d conns held' % cell.value,
                                  '%.1f MB, %.1f KB per connection' % (held, per_connection),
                                  '<= 150 MB at 5000', held <= 150))
    return figures


def summary(samples, factor, unit, digits=2):
    return '%.*f %s median, %.*f %s max' % (digits, statistics.median(samples) * factor, unit,
                                            digits, max(samples) * factor, unit)


FIGURES = {'startup': startup_figures, 'switch': switch_figures, 'delay': delay_figures,
           'bandwidth': bandwidth_figures}


def run_figures(groups, ports, scale, problems):
    figures = []
    for group, make in FIGURES.items():
        if group not in groups:
            continue
        progress('vaurien figures: ' + group)
        with tagged(problems, group + ' figures'):
            try:
                figures += make(ports, scale, problems)
            except FAILURES as exc:
                problems.append(describe(exc))
    return figures


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def absolute(cell, unit):
    return 'error' if cell is None else '%s %s' % (format(round(cell.value), ','), unit)


def ratio(cell, direct):
    if cell is None or direct is None or not direct.value:
        return None
    return cell.value / direct.value


def verdict(met):
    return {True: 'yes', False: 'NO', None: ''}[met]


def workload_table(rows, relays):
    header = ['workload', 'direct'] + ['%s ratio' % kind for kind in relays[1:]] \
        + ['vaurien target', 'met']
    lines = []
    for workload, cells in rows:
        direct = cells['direct']
        ratios = [ratio(cells[kind], direct) for kind in relays[1:]]
        texts = ['error' if cells[kind] is None else 'n/a' if value is None else '%.2f' % value
                 for kind, value in zip(relays[1:], ratios)]
        met = None if ratios[0] is None else ratios[0] >= workload.target
        lines.append([workload.label, absolute(direct, workload.unit)] + texts
                     + ['>= %.2f' % workload.target, verdict(met)])
    return markdown(header, lines)


def figure_table(figures):
    return markdown(['vaurien figure', 'value', 'target', 'met'],
                    [[figure.label, figure.value, figure.target, verdict(figure.met)]
                     for figure in figures])


def markdown(header, lines):
    """A Markdown table, its columns padded: the first left-aligned, the others right."""
    widths = [max(len(line[column]) for line in [header] + lines)
              for column in range(len(header))]

    def row(cells):
        return '| %s |' % ' | '.join(cell.ljust(width) if column == 0 else cell.rjust(width)
                                     for column, (cell, width) in enumerate(zip(cells, widths)))
    rule = '|%s|' % '|'.join('-' * (width + 2) if column == 0 else '-' * (width + 1) + ':'
                             for column, width in enumerate(widths))
    return '\n'.join([row(header), rule] + [row(line) for line in lines])


def report(rows, figures, relays, missing, problems, mode, load, elapsed):
    print('Vaurien %s benchmark, %s run: Python %s, %s, %d CPUs, load average %.2f at '
          'the start; relays: %s%s' % (
              vaurien.__version__, mode, platform.python_version(),
              platform.platform(terse=True), os.cpu_count(), load, ', '.join(relays[1:]),
              '; not installed: ' + ', '.join(missing) if missing else ''))
    if rows:
        print('\nEach ratio is the relay\'s figure / the direct one, in this run '
              '(1.00: the relay costs nothing).\n')
        print(workload_table(rows, relays))
        for workload, cells in rows:
            for kind, cell in cells.items():
                if cell is not None and cell.note:
                    print('- %s, %s: %s' % (workload.label, kind, cell.note))
    if figures:
        print()
        print(figure_table(figures))
    print('\nProblems seen: %s' % ('none' if not problems else ''))
    for problem in problems:
        print('- ' + problem)
    print('\nTook %.0f s.' % elapsed)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

GROUPS = ('bulk', 'roundtrip', 'redis', 'connect', 'concurrent') + tuple(FIGURES)
REDIS_TOOLS = ('redis-server', 'redis-benchmark')


class ProblemLog(logging.Handler):
    """What in-process proxies log as warnings or errors goes to the problems."""

    def __init__(self, problems):
        super().__init__(logging.WARNING)
        self.problems = problems

    def emit(self, record):
        self.problems.append('in-process vaurien logged: ' + self.format(record))


def progress(text, started=time.perf_counter()):
    print('[%5.1f s] %s' % (time.perf_counter() - started, text), file=sys.stderr, flush=True)


def fit_fd_limit(scale):
    """Raise the open-files limit, which the backends and the relays inherit, for
    the connections held; return the scale, holding no more than that allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * scale.concurrent + 512
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return dataclasses.replace(scale, concurrent=min(scale.concurrent, (soft - 512) // 2))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='small sizes: a smoke test for CI, under 30 s')
    parser.add_argument('--only', action='append', choices=GROUPS, metavar='NAME',
                        help='run only this part; repeat it for several (%s)' % ', '.join(GROUPS))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    groups = set(args.only or GROUPS)
    scale = fit_fd_limit(QUICK if args.quick else FULL)
    relays = ['direct', 'vaurien'] + [kind for kind, tool in RELAY_TOOLS.items()
                                      if shutil.which(tool)]
    missing = [tool for tool in list(RELAY_TOOLS.values()) + list(REDIS_TOOLS)
               if not shutil.which(tool)]
    problems = []
    logging.getLogger('vaurien').addHandler(ProblemLog(problems))
    with contextlib.ExitStack() as stack:
        ports = stack.enter_context(backends())
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        if 'redis' in groups and not any(tool in missing for tool in REDIS_TOOLS):
            ports.update(stack.enter_context(redis_backend(problems)))
        selected = [workload for workload in workloads(scale)
                    if workload.group in groups and workload.backend in ports]
        rows = run_table(selected, relays, ports, scale, problems)
        figures = run_figures(groups, ports, scale, problems) + memory_figures(rows)
    report(rows, figures, relays, missing, problems, 'quick' if args.quick else 'full', load,
           time.perf_counter() - started)
    return 0


if __name__ == '__main__':
    sys.exit(main())
