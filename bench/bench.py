#!/usr/bin/env python3
"""Vaurien's benchmark: what the proxy costs, next to a direct connection.

    python3 bench/bench.py                  # the full run, 2 to 4 minutes
    python3 bench/bench.py --quick          # small sizes: a smoke test, under a minute
    python3 bench/bench.py --only bulk --only delay
    python3 bench/bench.py --rounds 3       # each row 3 times: medians, and the spread
    VAURIEN_BENCH_MODULE=/tmp/vaurien.py python3 bench/bench.py --quick

VAURIEN_BENCH_MODULE names the vaurien.py to measure (imported for the
in-process figures, run as the relay): by default the one beside bench/.

Everything runs on 127.0.0.1, on ephemeral ports, with the standard library.
The backends are in this file: an echo, a sink and a source server, driven by
one selector in a child process, so that they never share the load
generator's interpreter.  Each workload runs against the backend directly,
then through each relay in turn: Vaurien as a ``python3 vaurien.py``
subprocess (its memory and CPU are its own); bench/minimal_relay.py, the
least a Python relay with one selector loop does (no handler, no fault, no
count): its column is the ceiling of a Python relay on the machine, and a
target above it is out of Python's reach there; and socat, haproxy and
toxiproxy-server when they are installed.  Clients and servers written in C
add rows when installed, each against its own server behind the same relays,
started for the run on an ephemeral port and stopped at its end:
redis-benchmark against redis-server; wrk against an nginx (a config of its
own in a temporary folder: one process, no access log, ``return 200 "ok"``);
iperf3 against an ``iperf3 -s``, its control and data connections both
through the relay.  A row whose tool is missing is skipped, with a note.

The workloads: bulk throughput one way or the other on one stream (upload:
client to server; download: server to client), from Python and from iperf3
(``-R`` for the download); echo round trips of 64 bytes on 1 connection, on
50 and on 500 at once; redis-benchmark PING on 1 and 50 connections; HTTP
requests per second from wrk (2 threads, 50 connections), keep-alive, then
with ``Connection: close``, a new connection per request; new connections
per second from Python (connect, one round trip, close); connections held
open at once, each checked to echo; and, in the "faults" rows, the echo over
50 connections and the bulk download again with a stack of faults on the
relay (Vaurien's stacked faults, toxiproxy-server's toxics: the same
Toxiproxy toxics, latency 0 each way, or latency 0, noop and a 1 GB/s
bandwidth each way), their direct column measured without.

Reading the table: "direct" is the absolute figure of the client against the
backend itself.  Each relay's column is the relay's figure divided by the
direct one measured in the same run: 1.00 means the relay costs nothing, 0.50
that it halves the throughput or the rate.  With ``--rounds N``, each row is
measured N times, direct and every relay, each round starting one relay later
than the round before (no relay always runs first, on the quietest machine):
a ratio is then the median of its N ratios, each to the direct figure of its
own round, with the lowest and the highest beside it, and "direct" is the
median direct figure.  The held connections are measured once.  "target" is Vaurien's goal for its
ratio, "met" says whether this run reached it.  On a small machine the
client, the backend and the relay share the CPUs: the ratios compare relays
run under the same load, not relays on hosts of their own, and they move by
about 0.1 from one run to the next (more when something else runs: the load
average at the start is printed).

Below the table come Vaurien's own figures, each with its target: start-up
time, control API latency, the accuracy of the ``delay`` and ``bandwidth``
handlers; from the held-connections row, its memory per held connection and
the seconds it takes to exit on SIGTERM with them all still open; and, in the
full run only, whether 20,000 connections held at once all echo.  That one
needs an open-files limit of 2 x 20,000 + 512 in each of the proxy (two
sockets per connection), the client and the backend: the benchmark raises its
soft limit, which they inherit, up to the hard limit, and when the hard limit
is below that the figure says so instead.  No figure fails the run: the exit
status is 0 unless the benchmark itself crashes.  What went wrong (lost or
wrong bytes, hangs, what a relay or a server logged, a Vaurien slow to exit
on SIGTERM in the other rows) is listed last.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import math
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
import time
import urllib.request
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAURIEN = os.path.abspath(os.environ.get('VAURIEN_BENCH_MODULE')
                          or os.path.join(ROOT, 'vaurien.py'))
MINIMAL_RELAY = os.path.join(ROOT, 'bench', 'minimal_relay.py')


def load_vaurien(path):
    """Import the vaurien.py at `path` as ``vaurien``: the module under test."""
    spec = importlib.util.spec_from_file_location('vaurien', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules['vaurien'] = module
    spec.loader.exec_module(module)
    return module


vaurien = load_vaurien(VAURIEN)

HOST = '127.0.0.1'
MESSAGE = 64             # bytes per echo round trip
BLOCK = 1 << 20          # bytes per bulk send and receive
IO_TIMEOUT = 10          # seconds a client socket waits on connect, send or recv
START_TIMEOUT = 10.0     # seconds a relay gets to accept connections
STOP_GRACE = 30.0        # seconds Vaurien gets to exit after SIGTERM, before SIGKILL
SLOW_STOP = 1.0          # seconds to exit after SIGTERM, idle, beyond which it is a problem
HOLD_TIMEOUT = 60.0      # seconds the held connections get to echo
MAX_CONNECTIONS = 6000   # haproxy's maxconn: above the connections held at once
DELAY = 0.05             # seconds of the delay handler measured
RATE = 1_000_000         # bytes per second of the bandwidth handler measured
RELAY_TOOLS = {'socat': 'socat', 'haproxy': 'haproxy', 'toxiproxy': 'toxiproxy-server'}
SBIN = ('/usr/local/sbin', '/usr/sbin', '/sbin')   # where to look too for servers (nginx)
HTTP_CONNECTIONS = 50    # wrk's connections
MANY_HELD = 20000        # connections held at once in the full run's last figure
READY = re.compile(r'Vaurien ready: proxy (\S+) -> \S+, control http://(\S+);')


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one run."""

    bulk_bytes: int       # bytes per bulk transfer...
    bulk_seconds: float   # ...unless it takes longer than this
    seconds: float        # duration of each measured rate
    connections: int      # connections doing round trips at once
    concurrent: int       # connections held open at once
    crowd: int            # connections doing round trips at once, in the crowded row
    tool_seconds: int     # duration of each wrk and iperf3 run (whole seconds)
    redis_requests: int   # requests per redis-benchmark run with 50 clients, half with 1
    starts: int           # samples of start_proxy()
    repeats: int          # samples of the other start-up and control API figures
    delay_samples: int    # round trips timed through the delay handler
    bandwidth_bytes: int  # bytes downloaded through the bandwidth handler
    many_held: int        # connections held at once in the last figure; 0: not run


FULL = Scale(bulk_bytes=400 * 10**6, bulk_seconds=10, seconds=2.0, connections=50,
             concurrent=5000, crowd=500, tool_seconds=3, redis_requests=50000, starts=5,
             repeats=20, delay_samples=30, bandwidth_bytes=3 * RATE, many_held=MANY_HELD)
QUICK = Scale(bulk_bytes=40 * 10**6, bulk_seconds=3, seconds=0.5, connections=50,
              concurrent=300, crowd=500, tool_seconds=1, redis_requests=10000, starts=2,
              repeats=5, delay_samples=8, bandwidth_bytes=RATE, many_held=0)


class Mismatch(Exception):
    """A relay lost, added or changed bytes."""


class RelayError(Exception):
    """A relay or backend could not be started."""


class Relay(NamedTuple):
    """Where a workload connects, and the process whose RSS is the relay's own."""

    address: tuple
    pid: int = None       # None: direct, or socat (one process per connection)
    control: tuple = None  # Vaurien's control API
    stop: object = None    # Vaurien's Stopper: a workload may stop it before the end
    toxics: str = None     # toxiproxy-server: the URL of its proxy's toxics
    kind: str = None       # its column: direct, vaurien, socat...


class Measured(NamedTuple):
    """A workload's figure through one relay."""

    value: float         # None: not applicable (faults, through socat)
    note: str = ''
    memory: tuple = None   # (MB resident with the connections held, KB per connection)
    stopped: float = None  # seconds to exit on SIGTERM, connections held (inf: killed)
    cpu: float = None      # us of the relay's CPU per unit (request, MB...), if known


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


NGINX_CONFIG = '''\
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            return 200 "ok\\n";
        }}
    }}
}}
'''


@contextlib.contextmanager
def nginx_backend(problems):
    """An nginx in the foreground, one process, answering 3 bytes to any GET,
    with its config, pid and error log in a temporary folder; yield {'nginx': port}.
    What it logged goes to `problems`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix='vaurien-bench-nginx-') as folder:
        config, log = os.path.join(folder, 'nginx.conf'), os.path.join(folder, 'error.log')
        with open(config, 'w') as stream:
            stream.write(NGINX_CONFIG.format(folder=folder, host=HOST, port=port))
        try:
            with external('nginx', [which('nginx'), '-p', folder, '-c', config, '-e', log],
                          port, problems):
                yield {'nginx': port}
        finally:
            with contextlib.suppress(FileNotFoundError), open(log, errors='replace') as lines:
                problems.extend('nginx logged: ' + line.rstrip() for line in lines
                                if line.strip())


# What iperf3 -s says on stderr that is no problem: a connection that closes
# before it sends a test (a relay's or the start's check that it accepts, which
# may reach it late, during a test), its exit.  A spoiled test is the client's error.
IPERF3_QUIET = re.compile(r'unable to receive (parameters from client|cookie at server)'
                          r'|client has unexpectedly closed|server has terminated')
IPERF3_ATTEMPTS = 3


@contextlib.contextmanager
def iperf3_backend(problems):
    """An ``iperf3 -s`` on a free port, serving test after test; yield {'iperf3': port}."""
    port = free_port()
    with external('iperf3', ['iperf3', '-s', '-B', HOST, '-p', str(port)], port, problems,
                  quiet=IPERF3_QUIET):
        yield {'iperf3': port}


SERVERS = {'redis': redis_backend, 'nginx': nginx_backend, 'iperf3': iperf3_backend}


def which(tool):
    """The path of `tool`, on the PATH or in an sbin folder, or None."""
    return shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(SBIN))


# ---------------------------------------------------------------------------
# Relays: direct, Vaurien, socat, haproxy, toxiproxy
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def direct_relay(port, problems):
    yield Relay((HOST, port))


@contextlib.contextmanager
def vaurien_relay(port, problems):
    """``python3 vaurien.py`` in front of `port`, with its control API; what it logs
    beyond its ready line and the info lines goes to `problems`.  A workload may
    stop it itself, through the relay's `stop`, and report the time it took.

    Its stderr goes to a file, read back, as other relays' do (see `external`):
    a thread reading a pipe in this process would take the GIL from the client
    timing the control API at each line Vaurien logs."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'stderr')
        with open(path, 'a') as stderr:     # appending: what this process reads moves nothing
            process = subprocess.Popen(
                [sys.executable, VAURIEN, '--local', '%s:0' % HOST,
                 '--distant', '%s:%d' % (HOST, port), '--http', '--http-host', HOST,
                 '--http-port', '0'],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)   # as every relay: see external
        stop = Stopper(process)
        try:
            local, control = vaurien_ready(path, process)
            yield Relay(local, process.pid, control, stop)
        finally:
            reported = stop.took is not None   # the workload stopped it and reports the time
            took = stop()
            with open(path, errors='replace') as lines:
                problems.extend('vaurien logged: ' + line.rstrip() for line in lines
                                if line.strip() and ' INFO ' not in line
                                and not READY.search(line))
            if took == math.inf:
                problems.append('vaurien did not exit within %g s of SIGTERM: killed'
                                % STOP_GRACE)
            elif process.returncode not in (0, -signal.SIGTERM):
                problems.append('vaurien exited with status %s' % process.returncode)
            elif took > SLOW_STOP and not reported:
                problems.append('vaurien took %.1f s to exit after SIGTERM' % took)


def vaurien_ready(path, process):
    """Vaurien's proxy and control addresses, from the ready line it writes to the
    file at `path` once it serves; RelayError if it exits or takes START_TIMEOUT
    seconds first."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with open(path, errors='replace') as stderr:
            text = stderr.read()
        match = READY.search(text)
        if match:
            return split_address(match[1]), split_address(match[2])
        if process.poll() is not None or time.monotonic() > deadline:
            raise RelayError('vaurien did not start: %s' % (
                ' | '.join(text.splitlines()) or 'no output'))
        time.sleep(0.005)


def split_address(text):
    host, _, port = text.rpartition(':')
    return host.strip('[]'), int(port)


class Stopper:
    """Stops a process once, however often called: returns the seconds it took
    to exit after SIGTERM, inf when it was killed after STOP_GRACE."""

    def __init__(self, process):
        self.process, self.took = process, None

    def __call__(self):
        if self.took is None:
            self.took = stop_process(self.process, STOP_GRACE)
        return self.took


def stop_process(process, grace):
    """Terminate, then kill if it is still there after `grace` seconds: return
    the seconds it took to exit, or inf when it had to be killed."""
    start = time.perf_counter()
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return math.inf
    return time.perf_counter() - start


@contextlib.contextmanager
def minimal_relay(port, problems):
    """bench/minimal_relay.py: one selector loop and nothing else, the ceiling of a
    Python relay on this machine."""
    listen_port = free_port()
    with external('minimal_relay', [sys.executable, MINIMAL_RELAY, str(listen_port), HOST,
                                    str(port)], listen_port, problems) as process:
        yield Relay((HOST, listen_port), process.pid)


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
        yield Relay((HOST, listen_port), process.pid,
                    toxics='http://%s:%d/proxies/bench/toxics' % (HOST, api_port))


@contextlib.contextmanager
def external(name, args, port, problems, quiet=None):
    """Run a tool in a session of its own until it accepts on `port`; yield its
    process; then end it with every child it forked.  What it printed on
    stderr goes to `problems`, but for the lines the regex `quiet` matches.

    A session of its own is also a scheduling group of its own where Linux
    groups by session (autogroup): a relay in the load generators' session
    would share their half of the CPUs instead of getting its own share.
    Vaurien's relay starts in one of its own too."""
    with tempfile.TemporaryFile('w+', errors='replace') as errors:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=errors, start_new_session=True)
        try:
            wait_accepting(port, process)
            yield process
        finally:
            stop_group(process)
            errors.seek(0)
            problems.extend('%s said: %s' % (name, line.rstrip()) for line in errors
                            if line.strip() and not (quiet and quiet.search(line)))


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


RELAYS = {'direct': direct_relay, 'vaurien': vaurien_relay, 'minimal': minimal_relay,
          'socat': socat_relay,
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


def cpu_seconds(pid):
    """The CPU seconds (user and system, every thread) process `pid` used so far, or
    None without a pid or /proc."""
    if pid is None:
        return None
    try:
        with open('/proc/%d/stat' % pid) as stat:
            fields = stat.read().rpartition(')')[2].split()   # from the 3rd field on
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def with_cpu(result, workload, before, after, elapsed):
    """`result` with the relay's CPU per unit of a rate (the units of `elapsed` seconds
    at its rate: the measure's own setup counts too, a few per cent)."""
    if before is None or after is None or result.value is None \
            or not workload.unit.endswith('/s') or not result.value:
        return result
    return result._replace(cpu=(after - before) * 1e6 / (result.value * elapsed))


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


def concurrent_round_trips(relay, scale, crowd=False):
    """Echo round trips on `scale.connections` connections at once (`scale.crowd`
    with `crowd`), from one selector."""
    count = scale.crowd if crowd else scale.connections
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(relay.address)) for _ in range(count)]
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


WRK_RATE = re.compile(r'^Requests/sec:\s*([\d.]+)', re.MULTILINE)
WRK_ERRORS = re.compile(r'^\s*(Socket errors: .*|Non-2xx or 3xx responses: \d+)$', re.MULTILINE)


def wrk(relay, scale, close=False):
    """wrk's GETs of nginx's 3 bytes on HTTP_CONNECTIONS connections, kept alive,
    or with `close` a ``Connection: close`` request: a new connection for each."""
    args = ['wrk', '-t2', '-c%d' % HTTP_CONNECTIONS, '-d%ds' % scale.tool_seconds,
            '--timeout', '%ds' % IO_TIMEOUT]
    if close:
        args += ['-H', 'Connection: close']
    result = subprocess.run(
        args + ['http://%s:%d/' % relay.address], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=scale.tool_seconds + 60, check=True)
    rate = WRK_RATE.search(result.stdout)
    if rate is None:
        raise RelayError('wrk printed no rate: %s' % (result.stdout + result.stderr))
    return Measured(float(rate[1]), ', '.join(WRK_ERRORS.findall(result.stdout)))


def iperf3(relay, scale, download=False):
    """iperf3 -c for `scale.tool_seconds`, one stream; `download`: -R, the server
    sends.  The figure is what the receiver counted, in MB/s.  A failed test is
    tried again, up to IPERF3_ATTEMPTS in all: iperf3 -s serves one client at a
    time, and a relay's check that it accepts may reach it late (haproxy's
    connection to the backend outlives the client that closed it), spoiling the
    test that comes at the same moment."""
    failures = []
    for _ in range(IPERF3_ATTEMPTS):
        try:
            result = iperf3_once(relay, scale, download)
        except RelayError as exc:
            failures.append(str(exc))
            time.sleep(0.5)
            continue
        if failures:
            result = result._replace(note='after %d failed: %s' % (len(failures),
                                                                   '; '.join(failures)))
        return result
    raise RelayError('; '.join(failures))


def iperf3_once(relay, scale, download):
    args = ['iperf3', '-c', relay.address[0], '-p', str(relay.address[1]),
            '-t', str(scale.tool_seconds), '-J'] + (['-R'] if download else [])
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=scale.tool_seconds + 60)
    try:
        output = json.loads(result.stdout)
    except ValueError:
        raise RelayError('iperf3 printed no JSON: %s' % (result.stdout + result.stderr)[:300]) \
            from None
    if 'error' in output:
        raise RelayError('iperf3: %s' % output['error'])
    return Measured(output['end']['sum_received']['bits_per_second'] / 8e6)


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
    on each at once; the value is the number that echoed correctly.  Vaurien
    is then stopped, all of them still open, to time its exit on SIGTERM."""
    idle = rss_mb(relay.pid)
    with contextlib.ExitStack() as stack:
        start = time.perf_counter()
        socks, failure = open_many(stack, relay.address, scale.concurrent)
        opened = time.perf_counter() - start
        echoed, echoing = ping_pong(socks, HOLD_TIMEOUT, rounds=1)
        held = rss_mb(relay.pid)
        stopped = relay.stop() if relay.stop else None   # SIGTERM, all still open
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
    if stopped is not None:
        notes.append('exit %.2f s after SIGTERM, all open' % stopped)
    return Measured(echoed, ', '.join(notes), memory, stopped)


def open_many(stack, address, count):
    """Open up to `count` connections, closed with `stack`: (sockets, error that stopped it)."""
    socks = []
    try:
        while len(socks) < count:
            socks.append(stack.enter_context(connect(address)))
    except OSError as exc:
        return socks, exc
    return socks, None


class NotApplicable(Exception):
    """A workload that a relay cannot run (faults, through socat): no figure, no problem."""


def with_toxics(measure, toxics):
    """`measure`, with `toxics` ([(type, attributes, stream)], Toxiproxy's) on the relay:
    on Vaurien as stacked faults through its control API (mapped as its Toxiproxy API
    maps them), on toxiproxy-server as toxics; direct is measured without them, as the
    baseline of the ratios; other relays have no faults."""
    def measured(relay, scale):
        if relay.control is not None:
            client = vaurien.Client(*relay.control)
            for kind, attributes, stream in toxics:
                handler, _, defaults, _, convert = vaurien.TOXICS[kind]
                client.add_fault(handler, direction=stream, **convert(dict(defaults,
                                                                           **attributes)))
        elif relay.toxics is not None:
            for kind, attributes, stream in toxics:
                body = json.dumps({'type': kind, 'stream': stream, 'name': '%s_%s_%d' % (
                    kind, stream, toxics.index((kind, attributes, stream))),
                    'attributes': attributes}).encode()
                urllib.request.urlopen(urllib.request.Request(
                    relay.toxics, body, {'Content-Type': 'application/json'}),
                    timeout=START_TIMEOUT).close()
        elif relay.kind != 'direct':
            raise NotApplicable()
        return measure(relay, scale)
    return measured


class Workload(NamedTuple):
    group: str        # its --only name
    label: str
    unit: str
    backend: str      # the backend the relays stand in front of
    measure: object   # measure(relay, scale) -> Measured
    target: float     # Vaurien's target ratio
    tools: tuple = ()  # the programs it needs: its client, its server
    repeated: bool = True   # measured in each round (--rounds), else in the first only


def workloads(scale):
    size = '%d MB' % (scale.bulk_bytes // 10**6)
    many = '%d conns' % scale.connections
    wrk_conns = 'wrk %d conns' % HTTP_CONNECTIONS
    return [
        Workload('bulk', 'bulk upload, 1 stream, ' + size, 'MB/s', 'sink', bulk_upload, 0.80),
        Workload('bulk', 'bulk download, 1 stream, ' + size, 'MB/s', 'source', bulk_download,
                 0.80),
        Workload('iperf3', 'bulk upload, iperf3, 1 stream', 'MB/s', 'iperf3', iperf3, 0.80,
                 ('iperf3',)),
        Workload('iperf3', 'bulk download, iperf3 -R, 1 stream', 'MB/s', 'iperf3',
                 functools.partial(iperf3, download=True), 0.80, ('iperf3',)),
        Workload('roundtrip', 'echo 64 B round trips, 1 conn', 'rt/s', 'echo', round_trips,
                 0.65),
        Workload('roundtrip', 'echo 64 B round trips, ' + many, 'rt/s', 'echo',
                 concurrent_round_trips, 0.35),
        Workload('crowd', 'echo 64 B round trips, %d conns' % scale.crowd, 'rt/s', 'echo',
                 functools.partial(concurrent_round_trips, crowd=True), 0.35),
        Workload('redis', 'redis-benchmark PING, 1 conn', 'rt/s', 'redis',
                 functools.partial(redis_ping, clients=1), 0.75,
                 ('redis-server', 'redis-benchmark')),
        Workload('redis', 'redis-benchmark PING, 50 conns', 'rt/s', 'redis',
                 functools.partial(redis_ping, clients=50), 0.50,
                 ('redis-server', 'redis-benchmark')),
        Workload('http', 'HTTP keep-alive, %s, nginx' % wrk_conns, 'req/s', 'nginx', wrk, 0.50,
                 ('nginx', 'wrk')),
        Workload('http', 'HTTP new conn per request, ' + wrk_conns, 'req/s', 'nginx',
                 functools.partial(wrk, close=True), 0.35, ('nginx', 'wrk')),
        Workload('connect', 'new conns: connect, 1 round trip, close', 'conn/s', 'echo',
                 new_connections, 0.35),
        Workload('concurrent', '%d conns held open, each echoing' % scale.concurrent, 'conns',
                 'echo', held_connections, 1.0, repeated=False),
        Workload('faults', 'echo 64 B round trips, %s, latency 0 each way' % many, 'rt/s',
                 'echo', with_toxics(concurrent_round_trips, LATENCY_0), 0.35),
        Workload('faults', 'echo 64 B round trips, %s, 3 toxics each way' % many, 'rt/s',
                 'echo', with_toxics(concurrent_round_trips, THREE_TOXICS), 0.35),
        Workload('faults', 'bulk download, 1 stream, %s, latency 0 each way' % size, 'MB/s',
                 'source', with_toxics(bulk_download, LATENCY_0), 0.80),
    ]


#: The fault rows' stacks, as Toxiproxy's toxics (type, attributes, stream).
LATENCY_0 = [('latency', {'latency': 0}, stream) for stream in ('upstream', 'downstream')]
THREE_TOXICS = [(kind, attributes, stream) for stream in ('upstream', 'downstream')
                for kind, attributes in (('latency', {'latency': 0}), ('noop', {}),
                                         ('bandwidth', {'rate': 1000000}))]   # 1 GB/s


FAILURES = (OSError, Mismatch, RelayError, subprocess.SubprocessError, vaurien.VaurienError)


def describe(exc):
    if isinstance(exc, BlockingIOError):
        return 'no answer within %d s' % IO_TIMEOUT
    return '%s: %s' % (type(exc).__name__, exc)


def run_table(selected, relays, ports, scale, problems, rounds=1):
    """Each workload, direct and through each relay, in `rounds` rounds:
    [(Workload, [{relay: Measured or None}, one per round])].  Each round starts
    one relay later than the round before: no relay always runs first, on the
    quietest machine, or last."""
    table = []
    for workload in selected:
        results = []
        repeats = rounds if workload.repeated else 1
        for number in range(repeats):
            start = number % len(relays)
            results.append({kind: measure_cell(workload, kind, ports[workload.backend], scale,
                                               problems, number if repeats > 1 else None)
                            for kind in relays[start:] + relays[:start]})
        table.append((workload, results))
    return table


def measure_cell(workload, kind, port, scale, problems, number=None):
    """One workload through one relay (in round `number`, counted from 0, if
    several); None, and a problem, when it fails."""
    where = '%s, %s' % (workload.label, kind)
    if number is not None:
        where += ', round %d' % (number + 1)
    with tagged(problems, where):
        try:
            with RELAYS[kind](port, problems) as relay:
                before, started = cpu_seconds(relay.pid), time.perf_counter()
                result = workload.measure(relay._replace(kind=kind), scale)
                result = with_cpu(result, workload, before, cpu_seconds(relay.pid),
                                  time.perf_counter() - started)
        except NotApplicable:
            result = Measured(None)     # n/a in the table
        except FAILURES as exc:
            problems.append(describe(exc))
            result = None
    progress('%s: %s' % (where, absolute(result, workload.unit)))
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
        Figure('start_proxy() until ready', summary(subprocesses, 1, 's', 3), '<= 0.1 s',
               statistics.median(subprocesses) <= 0.1),
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
               '<= 0.2 ms median', statistics.median(switches) <= 0.0002),
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


def many_held_figures(ports, scale, problems):
    """MANY_HELD connections held through Vaurien, each echoing: only in the full
    run, and when the open-files limit (raised by fit_fd_limit) allows them."""
    label = '%s conns held open, all echoing' % format(scale.many_held or MANY_HELD, ',')
    if not scale.many_held:
        return [Figure(label, 'not run: full run only', 'all echo')]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < fds_needed(scale.many_held):
        return [Figure(label, 'not run: open files limit %s (hard %s), %s needed' % (
            format(soft, ','), format(hard, ','), format(fds_needed(scale.many_held), ',')),
            'all echo')]
    with vaurien_relay(ports['echo'], problems) as relay:
        cell = held_connections(relay, dataclasses.replace(scale, concurrent=scale.many_held))
    progress('%s: %s' % (label, cell.note))
    return [Figure(label, '%s of %s echoed' % (format(cell.value, ','),
                                               format(scale.many_held, ',')),
                   'all echo', cell.value == scale.many_held)]


def held_figures(rows):
    """From the held-connections row: Vaurien's RSS per connection held, and the
    seconds it took to exit after SIGTERM with them all open."""
    figures = []
    for workload, results in rows:
        cell = results[0].get('vaurien')
        if workload.measure is not held_connections or cell is None:
            continue
        if cell.memory:
            held, per_connection = cell.memory
            figures.append(Figure('RSS per held conn, %s held' % format(cell.value, ','),
                                  '%.1f KB (%.1f MB in all)' % (per_connection, held),
                                  '<= 4 KB', per_connection <= 4))
        if cell.stopped is not None:
            figures.append(Figure(
                'exit after SIGTERM with %s conns open' % format(cell.value, ','),
                'killed after %g s' % STOP_GRACE if cell.stopped == math.inf
                else '%.2f s' % cell.stopped, '<= 0.5 s', cell.stopped <= 0.5))
    return figures


def summary(samples, factor, unit, digits=2):
    return '%.*f %s median, %.*f %s max' % (digits, statistics.median(samples) * factor, unit,
                                            digits, max(samples) * factor, unit)


FIGURES = {'startup': startup_figures, 'switch': switch_figures, 'delay': delay_figures,
           'bandwidth': bandwidth_figures, 'held20k': many_held_figures}


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
    if cell is None or cell.value is None:
        return 'error' if cell is None else 'n/a'
    return '%s %s' % (format(round(cell.value), ','), unit)


def ratio(cell, direct):
    if cell is None or cell.value is None or direct is None or not direct.value:
        return None
    return cell.value / direct.value


def verdict(met):
    return {True: 'yes', False: 'NO', None: ''}[met]


def median_direct(results):
    """The direct cell of the round whose direct figure is the median, or None."""
    cells = sorted((cell for cell in (result['direct'] for result in results)
                    if cell is not None and cell.value is not None), key=lambda cell: cell.value)
    return cells[(len(cells) - 1) // 2] if cells else None


def relay_ratios(results, kind):
    """`kind`'s ratios to direct, one per round that measured both."""
    ratios = (ratio(result[kind], result['direct']) for result in results)
    return [value for value in ratios if value is not None]


def ratio_text(results, kind, ratios):
    """The median ratio, with the lowest and highest when there were several rounds."""
    if not ratios:
        return 'n/a' if all(result[kind] is not None for result in results) else 'error'
    text = '%.2f' % statistics.median(ratios)
    return text + ' (%.2f-%.2f)' % (min(ratios), max(ratios)) if len(results) > 1 else text


def workload_table(rows, relays):
    header = ['workload', 'direct'] + ['%s ratio' % kind for kind in relays[1:]] \
        + ['vaurien target', 'met']
    lines = []
    for workload, results in rows:
        ratios = {kind: relay_ratios(results, kind) for kind in relays[1:]}
        texts = [ratio_text(results, kind, ratios[kind]) for kind in relays[1:]]
        met = statistics.median(ratios['vaurien']) >= workload.target \
            if ratios['vaurien'] else None
        lines.append([workload.label, absolute(median_direct(results), workload.unit)] + texts
                     + ['>= %.2f' % workload.target, verdict(met)])
    return markdown(header, lines)


def cpu_table(rows, relays):
    """The relays' CPU per unit of each rate, median of the rounds; None if none known."""
    kinds = relays[1:]
    lines = []
    for workload, results in rows:
        texts = []
        for kind in kinds:
            values = [result[kind].cpu for result in results
                      if result[kind] is not None and result[kind].cpu is not None]
            texts.append('%.1f' % statistics.median(values) if values else '-')
        if any(text != '-' for text in texts):
            unit = 'us/' + workload.unit.rpartition('/')[0]
            lines.append([workload.label, unit] + texts)
    return markdown(['relay CPU per unit', 'unit'] + kinds, lines) if lines else None


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


def report(rows, skipped, figures, relays, missing, problems, mode, load, elapsed):
    print('Vaurien %s benchmark, %s: Python %s, %s, %d CPUs, load average %.2f at '
          'the start; relays: %s%s%s' % (
              vaurien.__version__, mode, platform.python_version(),
              platform.platform(terse=True), os.cpu_count(), load, ', '.join(relays[1:]),
              '; not installed: ' + ', '.join(missing) if missing else '',
              '' if VAURIEN == os.path.join(ROOT, 'vaurien.py') else '; vaurien: ' + VAURIEN))
    if rows:
        print('\nEach ratio is the relay\'s figure / the direct one, in this run '
              '(1.00: the relay costs nothing)%s.\n' % (
                  '; with several rounds, the median of the ratios of the rounds, and '
                  'the lowest and highest' if any(len(results) > 1 for _, results in rows)
                  else ''))
        print(workload_table(rows, relays))
        cpu = cpu_table(rows, relays)
        if cpu:
            print('\nThe relay\'s own CPU (user and system, from /proc; ticks of 10 ms: '
                  'coarse on the short bulk rows) per unit of work, in microseconds:\n')
            print(cpu)
            print()
        for workload, results in rows:
            for number, cells in enumerate(results):
                where = ', round %d' % (number + 1) if len(results) > 1 else ''
                for kind, cell in cells.items():
                    if cell is not None and cell.note:
                        print('- %s, %s%s: %s' % (workload.label, kind, where, cell.note))
    for label, why in skipped:
        print('- skipped, %s: %s' % (label, why))
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

GROUPS = ('bulk', 'iperf3', 'roundtrip', 'crowd', 'redis', 'http', 'connect',
          'concurrent', 'faults') + tuple(FIGURES)


class ProblemLog(logging.Handler):
    """What in-process proxies log as warnings or errors goes to the problems."""

    def __init__(self, problems):
        super().__init__(logging.WARNING)
        self.problems = problems

    def emit(self, record):
        self.problems.append('in-process vaurien logged: ' + self.format(record))


def progress(text, started=time.perf_counter()):
    print('[%5.1f s] %s' % (time.perf_counter() - started, text), file=sys.stderr, flush=True)


def fds_needed(connections):
    """Open files for a relay holding `connections`: two sockets each, and some."""
    return 2 * connections + 512


def fit_fd_limit(scale):
    """Raise the open-files limit, which the backends and the relays inherit, for
    the connections held, up to the hard limit; return the scale, holding no more
    than that allows (many_held: the figure checks it and says why it did not run)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = fds_needed(max(scale.concurrent, scale.crowd, scale.many_held))
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    most = (soft - 512) // 2 if soft != resource.RLIM_INFINITY else math.inf
    return dataclasses.replace(scale, concurrent=min(scale.concurrent, most),
                               crowd=min(scale.crowd, most))


def select_workloads(scale, groups):
    """The workloads of `groups` whose tools are installed, and (label, why) of
    those skipped."""
    selected, skipped = [], []
    for workload in workloads(scale):
        if workload.group not in groups:
            continue
        absent = [tool for tool in workload.tools if not which(tool)]
        if absent:
            skipped.append((workload.label, ' and '.join(absent) + ' not installed'))
        else:
            selected.append(workload)
    return selected, skipped


def start_servers(stack, selected, problems):
    """Start the servers the workloads need beside the echo, sink and source (redis,
    nginx, iperf3), closed with `stack`; return {backend: port} of those that started."""
    ports = {}
    for backend in dict.fromkeys(workload.backend for workload in selected):
        if backend not in SERVERS:
            continue
        with tagged(problems, backend + ' server'):
            try:
                ports.update(stack.enter_context(SERVERS[backend](problems)))
            except FAILURES as exc:
                problems.append(describe(exc))
    return ports


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='small sizes: a smoke test for CI, under a minute')
    parser.add_argument('--only', action='append', choices=GROUPS, metavar='NAME',
                        help='run only this part; repeat it for several (%s)' % ', '.join(GROUPS))
    parser.add_argument('--rounds', type=positive, default=1, metavar='N',
                        help='measure each row N times, each relay in turn first; a ratio is '
                             'then the median of its rounds, the lowest and highest beside it')
    return parser.parse_args(argv)


def positive(text):
    """argparse's type for --rounds: a whole number, 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError('a whole number of rounds, 1 or more: %r' % text)
    return int(text)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    groups = set(args.only or GROUPS)
    scale = fit_fd_limit(QUICK if args.quick else FULL)
    relays = ['direct', 'vaurien', 'minimal'] + [kind for kind, tool in RELAY_TOOLS.items()
                                      if shutil.which(tool)]
    tools = list(RELAY_TOOLS.values()) + [tool for workload in workloads(scale)
                                          for tool in workload.tools]
    missing = [tool for tool in dict.fromkeys(tools) if not which(tool)]
    selected, skipped = select_workloads(scale, groups)
    problems = []
    logging.getLogger('vaurien').addHandler(ProblemLog(problems))
    with contextlib.ExitStack() as stack:
        ports = stack.enter_context(backends())
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        ports.update(start_servers(stack, selected, problems))
        skipped += [(workload.label, 'its %s server did not start' % workload.backend)
                    for workload in selected if workload.backend not in ports]
        selected = [workload for workload in selected if workload.backend in ports]
        rows = run_table(selected, relays, ports, scale, problems, args.rounds)
        figures = run_figures(groups, ports, scale, problems) + held_figures(rows)
    report(rows, skipped, figures, relays, missing, problems,
           ('quick' if args.quick else 'full') + ' run' + (
               ', %d rounds' % args.rounds if args.rounds > 1 else ''),
           load, time.perf_counter() - started)
    return 0


if __name__ == '__main__':
    sys.exit(main())
