"""Tests of Vaurien on real sockets: what reaches the wire, EOF versus RST, timing.

Every server and client here listens on 127.0.0.1 ephemeral ports.  Waits
use deadlines, timing bounds are one-sided and generous, and every thread,
socket and process is cleaned up by the fixtures.
"""

import array
import contextlib
import decimal
import functools
import gc
import hashlib
import importlib.util
import http.client
import http.server
import inspect
import json
import logging
import os
import random
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import pytest

import vaurien
from vaurien import Client, Proxy, start_proxy, stop_proxy

HERE = os.path.dirname(os.path.abspath(__file__))
VAURIEN = os.path.join(HERE, 'vaurien.py')
LOOP = '127.0.0.1'
WAIT = 10.0   # seconds: the deadline of every wait that should end much sooner


# ---------------------------------------------------------------------------
# Test backends and clients
# ---------------------------------------------------------------------------

class Backend:
    """A TCP server (on an ephemeral port unless given one, or on `listener`) running
    `serve(sock)` in a thread per connection."""

    def __init__(self, serve, address=(LOOP, 0), listener=None):
        self.serve = serve
        self.listener = listener or socket.create_server(tuple(address), backlog=1024)
        self.address = self.listener.getsockname()
        self.accepted = 0
        self.live = {}     # socket: thread
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            with self.lock:
                self.live[sock] = thread
            thread.start()

    def _run(self, sock):
        try:
            sock.settimeout(WAIT)
            self.serve(sock)
        except OSError:
            pass
        finally:
            sock.close()
            with self.lock:
                self.live.pop(sock, None)

    def close(self):
        """Stop listening and end every connection (as a server that dies)."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(WAIT)
        with self.lock:
            live = list(self.live.items())
        for sock, _ in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in live:
            thread.join(WAIT)


def chunk_server(answer):
    """A `serve` that answers each chunk with answer(chunk), and half-closes at EOF."""
    def serve(sock):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(answer(data))
        sock.shutdown(socket.SHUT_WR)
    return serve


echo = chunk_server(lambda data: data)


def read_all(sock, deadline=WAIT):
    """Everything until EOF; raises if the deadline passes first."""
    sock.settimeout(deadline)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b''.join(chunks)
        chunks.append(data)


def read_exactly(sock, size, deadline=WAIT):
    sock.settimeout(deadline)
    chunks, got = [], 0
    while got < size:
        data = sock.recv(min(65536, size - got))
        if not data:
            raise EOFError('EOF after %d of %d bytes' % (got, size))
        chunks.append(data)
        got += len(data)
    return b''.join(chunks)


def outcome(sock, deadline=WAIT):
    """('eof', data), ('rst', data) or ('open', data) after waiting up to `deadline`."""
    sock.settimeout(deadline)
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return 'eof', b''.join(chunks)
            chunks.append(data)
    except ConnectionResetError:
        return 'rst', b''.join(chunks)
    except socket.timeout:
        return 'open', b''.join(chunks)


def wait_for(condition, deadline=WAIT, what='condition'):
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.01)


def connect(address):
    sock = socket.create_connection(address, timeout=WAIT)
    return sock


@pytest.fixture
def echo_backend():
    backend = Backend(echo)
    yield backend
    backend.close()


@pytest.fixture
def dead_port():
    """A loopback port where connecting is refused, and that no bind(0) of the run takes
    (a port closed would come back to one in 14,000): bound, not listening.  Its
    `.free()` lets the test bind it itself."""
    class Reserved(int):
        def free(self):
            holder.close()
    holder = socket.socket()
    holder.bind((LOOP, 0))
    yield Reserved(holder.getsockname()[1])
    holder.close()


@pytest.fixture
def make_proxy():
    """Start in-process proxies on ephemeral ports; stop them all afterwards."""
    proxies = []

    def make(distant, **options):
        options.setdefault('http_port', 0)
        proxy = Proxy('%s:0' % LOOP, '%s:%d' % tuple(distant[:2]), **options).start()
        proxies.append(proxy)
        return proxy
    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy, echo_backend):
    return make_proxy(echo_backend.address, http=True)


def run_cli(*args, timeout=30, cwd=HERE):
    return subprocess.run([sys.executable, VAURIEN] + list(args), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


class CliProxy:
    """`python vaurien.py ...` in a subprocess, ready once it printed its ready line.

    `files` gives the child's (soft, hard) limit of open files.
    """

    def __init__(self, *args, cwd=HERE, files=None, local=LOOP + ':0'):
        limit = files and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, files))
        self.process = subprocess.Popen(
            [sys.executable, VAURIEN, '--http', '--http-port', '0']
            + (['--local', local] if local else []) + list(args), stderr=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=limit)
        self.lines = []
        for line in self.process.stderr:
            self.lines.append(line)
            ready = vaurien._READY.search(line)
            if ready:
                self.address = vaurien.parse_address(ready.group(1))
                self.control = vaurien.parse_address(ready.group(3))
                break
        else:
            self.process.kill()
            self.process.wait(WAIT)
            raise AssertionError('no ready line: %s' % ''.join(self.lines))
        self.rest = []
        self.drain = threading.Thread(target=self.rest.extend, args=(self.process.stderr,),
                                      daemon=True)
        self.drain.start()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self.drain.join(WAIT)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def cli_proxy():
    started = []

    def make(*args, **kw):
        started.append(CliProxy(*args, **kw))
        return started[-1]
    yield make
    for proc in started:
        proc.stop()


def round_trip(address, payload=b'ping'):
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


# ---------------------------------------------------------------------------
# The relay
# ---------------------------------------------------------------------------

def test_normal_relays_bytes_both_ways(proxy):
    payload = os.urandom(300000)
    assert round_trip(proxy.address, payload) == payload


def test_port_zero_binds_and_reports_the_real_port(proxy):
    host, port = proxy.address
    assert host == LOOP and port > 0
    assert proxy.control[1] > 0


def test_half_close_client_gets_the_whole_reply():
    """The client sends, shuts its write side, and must still read the whole reply."""
    reply = os.urandom(2_000_000)

    def answer_at_eof(sock):
        received = read_all(sock)
        time.sleep(0.2)  # the reply comes well after the client's FIN
        sock.sendall(hashlib.sha256(received).digest() + reply)
        sock.shutdown(socket.SHUT_WR)
    backend = Backend(answer_at_eof)
    try:
        with Proxy(LOOP + ':0', '%s:%d' % backend.address) as proxy, \
                connect(proxy.address) as sock:
            request = os.urandom(100000)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data = read_all(sock)
        assert data == hashlib.sha256(request).digest() + reply
    finally:
        backend.close()


def test_half_close_from_the_backend_keeps_the_client_direction_open():
    """The backend closes its write side first; the client can still send to it."""
    def greet_then_listen(sock):
        sock.sendall(b'hello')
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)
        assert data == b'late data'
        backend.got = data
    backend = Backend(greet_then_listen)
    backend.got = None
    try:
        with Proxy(LOOP + ':0', '%s:%d' % backend.address) as proxy, \
                connect(proxy.address) as sock:
            assert read_all(sock) == b'hello'   # EOF relayed, as a half-close
            sock.sendall(b'late data')
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: backend.got == b'late data', what='data after the half-close')
    finally:
        backend.close()


def reset_seen(sock, deadline=WAIT):
    """Whether a reset reaches `sock`, whose EOF was read, within `deadline`: recv
    would give EOF again, a poll for nothing shows the error."""
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & select.POLLERR for _, events in poller.poll(deadline * 1000))


@pytest.mark.parametrize('resetting', ['client', 'backend'])
def test_a_reset_after_an_eof_is_relayed_while_the_other_end_is_silent(resetting):
    """A peer sends its FIN, then aborts (a client giving up on a slow answer): the
    other end, which reads nothing more, still gets the reset, and the proxy lets
    the connection go."""
    eof_read, other_end = threading.Event(), {}

    def backend_side(sock):
        if resetting == 'backend':
            sock.sendall(b'answer')
            sock.shutdown(socket.SHUT_WR)
            eof_read.wait(WAIT)      # the client read the answer and its EOF
            return rst_close(sock)
        assert read_all(sock) == b'request'
        eof_read.set()
        other_end['reset'] = reset_seen(sock)
    backend = Backend(backend_side)
    try:
        with Proxy(LOOP + ':0', '%s:%d' % backend.address) as proxy:
            sock = connect(proxy.address)
            if resetting == 'client':
                sock.sendall(b'request')
                sock.shutdown(socket.SHUT_WR)
                eof_read.wait(WAIT)
                rst_close(sock)
                wait_for(lambda: 'reset' in other_end, WAIT + 1, 'the backend')
            else:
                with sock:
                    assert read_all(sock) == b'answer'
                    eof_read.set()
                    other_end['reset'] = reset_seen(sock)
            assert other_end['reset']
            wait_for(lambda: not proxy.connection_count, what='the connection to end')
    finally:
        backend.close()


def test_a_backend_that_writes_while_reading_does_not_deadlock_the_pump():
    """Each chunk is answered with 4 times its size while the client sends megabytes."""
    backend = Backend(chunk_server(lambda data: data * 4))
    try:
        with Proxy(LOOP + ':0', '%s:%d' % backend.address) as proxy, \
                connect(proxy.address) as sock:
            payload = os.urandom(8_000_000)
            received = []
            reader = threading.Thread(target=lambda: received.append(read_all(sock, 60)))
            reader.start()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reader.join(60)
        assert len(received[0]) == 4 * len(payload)
    finally:
        backend.close()


def test_unreachable_backend_closes_the_client_promptly_and_is_logged(make_proxy, caplog,
                                                                       dead_port):
    proxy = make_proxy((LOOP, dead_port))
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        for _ in range(3):
            with connect(proxy.address) as sock:
                started = time.monotonic()
                assert outcome(sock)[0] in ('eof', 'rst')
                assert time.monotonic() - started < 5
    assert 'unreachable' in caplog.text and 'refused' in caplog.text.lower()


def test_an_outage_of_the_backend_is_one_line_and_its_end_another(make_proxy, caplog,
                                                                   dead_port):
    dead = (LOOP, dead_port)
    proxy = make_proxy(dead)
    with caplog.at_level(logging.INFO, logger='vaurien'):
        for _ in range(30):
            with connect(proxy.address) as sock:
                assert outcome(sock)[0] in ('eof', 'rst')
        dead_port.free()
        backend = Backend(echo, dead)         # the backend comes back, on its port
        try:
            assert round_trip(proxy.address) == b'ping'
            assert round_trip(proxy.address) == b'ping'
        finally:
            backend.close()
    lines = [r.getMessage() for r in caplog.records if r.name == 'vaurien']
    down = [line for line in lines if 'answers again, after' not in line
            and 'unreachable' in line]
    assert len(down) == 1 and 'connections are closed until it answers again' in down[0]
    back = [line for line in lines if 'answers again, after' in line]
    assert len(back) == 1 and '(30 connections closed)' in back[0]


def test_each_connection_is_logged_at_debug_opened_and_closed(make_proxy, echo_backend,
                                                             caplog):
    proxy = make_proxy(echo_backend.address)
    with caplog.at_level(logging.DEBUG, logger='vaurien'):
        assert round_trip(proxy.address, b'hello') == b'hello'
        with connect(proxy.address) as sock:
            sock.sendall(b'abc')
            assert read_exactly(sock, 3) == b'abc'
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    lines = [r.getMessage() for r in caplog.records if r.name == 'vaurien']
    assert sum(re.fullmatch(r'connection #[01] from 127\.0\.0\.1:\d+ opened: normal', line)
               is not None for line in lines) == 2
    first = [line for line in lines if line.startswith('connection #0 ') and 'closed' in line]
    assert re.fullmatch(r'connection #0 from 127\.0\.0\.1:\d+ closed: normal, 5 B to the '
                        r'backend, 5 B to the client, EOF both ways, \d+\.\d{3} s', first[0])
    second = [line for line in lines if line.startswith('connection #1 ') and 'closed' in line]
    assert 'RST from the client' in second[0] and '3 B to the backend' in second[0]


def test_finished_connections_release_threads_and_sockets(proxy):
    for _ in range(5):   # warm up lazily created threads and sockets
        round_trip(proxy.address)
    wait_for(lambda: proxy.connection_count == 0, what='connections to end')
    before = proc_counts(os.getpid())
    for _ in range(200):
        assert round_trip(proxy.address, b'x') == b'x'
    wait_for(lambda: proxy.connection_count == 0, what='connections to end')
    wait_for(lambda: proc_counts(os.getpid()) <= before,
             what='descriptors and threads back to %s' % (before,))


# ---------------------------------------------------------------------------
# Built-in handlers of the announcement
# ---------------------------------------------------------------------------

def timestamped_backend():
    """Records when each chunk arrives; answers `pong` to each."""
    def arrived(data):
        backend.arrivals.append((time.monotonic(), data))
        return b'pong'
    backend = Backend(chunk_server(arrived))
    backend.arrivals = []
    return backend


def test_delay_holds_data_to_the_backend_not_the_replies(make_proxy):
    backend = timestamped_backend()
    try:
        proxy = make_proxy(backend.address)
        proxy.set_handler('delay', sleep=1.0)     # long: a stall does not pass for it
        with connect(proxy.address) as sock:
            sent = time.monotonic()
            sock.sendall(b'ping')
            assert read_exactly(sock, 4) == b'pong'
            arrived = backend.arrivals[0][0]
            assert arrived - sent >= 0.99
            assert time.monotonic() - arrived < 0.9    # the reply was not delayed
    finally:
        backend.close()


def test_delay_shifts_a_stream_instead_of_slowing_it(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('delay', sleep=0.3)
    with connect(proxy.address) as sock:
        started = time.monotonic()
        for i in range(10):
            sock.sendall(b'%02d' % i)
            time.sleep(0.02)
        assert read_exactly(sock, 20) == b''.join(b'%02d' % i for i in range(10))
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3
    assert elapsed < 2.5    # ten chunks one after the other would take 3 s


def test_delay_default_and_config_settings_are_typed():
    handlers = vaurien.default_handlers()
    assert handlers['delay'].settings['sleep'] == 1.0
    assert handlers['delay'].validate({'sleep': '2'})['sleep'] == 2.0
    assert handlers['delay'].validate({'sleep': 2})['sleep'] == 2.0


def test_errors_answers_http_with_a_complete_503(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    conn = http.client.HTTPConnection(*proxy.address, timeout=WAIT)
    conn.request('GET', '/')
    response = conn.getresponse()
    assert response.status == 503
    assert response.getheader('Connection') == 'close'
    assert response.read() == b'Service Unavailable\n'
    conn.close()
    assert echo_backend.accepted == 0


def test_errors_http_request_sent_in_segments_gets_its_answer_not_a_reset(make_proxy,
                                                                         echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    with connect(proxy.address) as sock:
        for part in (b'GET / HT', b'TP/1.1\r\nHost: x\r\n', b'Accept: */*\r\n', b'\r\n'):
            sock.sendall(part)
            time.sleep(0.1)
        kind, data = outcome(sock)
    assert kind == 'eof'
    head, _, body = data.partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 503 Service Unavailable\r\n')
    assert b'Content-Length: %d' % len(body) in head


def test_errors_status_and_message_are_settable(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', status=500, message='boom')
    with connect(proxy.address) as sock:
        sock.sendall(b'POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n')
        data = read_all(sock)
    assert data.startswith(b'HTTP/1.1 500 Internal Server Error\r\n')
    assert data.endswith(b'\r\n\r\nboom\n')


def test_errors_on_other_protocols_writes_an_error_payload_and_closes(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', message='no such luck')
    with connect(proxy.address) as sock:
        sock.sendall(b'\x00\x01binary hello')
        assert outcome(sock) == ('eof', b'no such luck')
    proxy.set_handler('errors', size=32)
    with connect(proxy.address) as sock:
        sock.sendall(b'\x00\x01binary hello')
        kind, data = outcome(sock)
        assert kind == 'eof' and len(data) == 32


def test_hang_reads_never_answers_and_ends_when_the_client_leaves(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:hang')
    with connect(proxy.address) as sock:
        sock.sendall(b'anyone there?')
        assert outcome(sock, deadline=0.5) == ('open', b'')
        sock.sendall(b'x' * 100000)   # read and discarded: the client is never blocked
        assert outcome(sock, deadline=0.3) == ('open', b'')
    wait_for(lambda: proxy.connection_count == 0, what='the hung connection to end')
    assert echo_backend.accepted == 0


def test_blackout_closes_at_once_without_touching_the_backend(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:blackout')
    with connect(proxy.address) as sock:
        started = time.monotonic()
        kind, data = outcome(sock)
        assert kind in ('eof', 'rst') and data == b''
        assert time.monotonic() - started < 2
    assert echo_backend.accepted == 0


# ---------------------------------------------------------------------------
# Custom handlers
# ---------------------------------------------------------------------------

def raising(source, dest, to_backend, name, settings, proxy):
    raise RuntimeError('handler bug')


def ending(source, dest, to_backend, name, settings, proxy):
    dest.sendall(proxy.get_data(source))
    return False


def garbage(source, dest, to_backend, name, settings, proxy):
    dest.sendall(proxy.get_data(source))
    return {'not': 'a boolean'}


def announcement_style_delay(source, dest, to_backend, name, settings, proxy):
    """The announcement's delay, with time.sleep for gevent.sleep."""
    if to_backend:
        time.sleep(settings.get('sleep', 1))
    dest.sendall(proxy.get_data(source))


def custom_registry(**funcs):
    handlers = vaurien.default_handlers()
    for name, func in funcs.items():
        handlers[name] = vaurien.Handler(name, func)
    return handlers


@pytest.mark.parametrize('called_as', ['handler', 'fault', 'built-in fault'])
def test_a_handler_that_raises_resets_its_connection_only(make_proxy, echo_backend, caplog,
                                                          called_as):
    proxy = make_proxy(echo_backend.address, handlers=custom_registry(raising=raising))
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        if called_as == 'fault':
            proxy.add_fault('raising', name='buggy')
        elif called_as == 'built-in fault':   # a built-in is called another way: a bug in
            proxy.add_fault('delay', name='buggy', direction='both')   # one is caught too
            proxy.fault_stack[0].settings['sleep'] = 'not a number'
        else:
            proxy.set_handler('raising')
        with connect(proxy.address) as sock:
            sock.sendall(b'x')
            assert outcome(sock)[0] == 'rst'   # never a clean EOF: it is no whole answer
    assert 'handler %s failed' % ('raising' if called_as == 'handler' else 'buggy') \
        in caplog.text and ('RuntimeError: handler bug' in caplog.text or
                            called_as == 'built-in fault' and 'TypeError' in caplog.text)
    proxy.clear_faults()
    proxy.set_handler('normal')
    assert round_trip(proxy.address) == b'ping'


def test_returning_false_ends_the_connection_other_values_go_on(make_proxy):
    backend = timestamped_backend()
    try:
        proxy = make_proxy(backend.address,
                           handlers=custom_registry(ending=ending, garbage=garbage))
        proxy.set_handler('garbage')
        assert round_trip(proxy.address, b'abc') == b'pong'
        proxy.set_handler('ending')
        with connect(proxy.address) as sock:
            sock.sendall(b'xyz')
            assert outcome(sock)[0] == 'eof'   # what the handler sent went out first
        wait_for(lambda: [data for _, data in backend.arrivals] == [b'abc', b'xyz'],
                 what='the last chunk to reach the backend')
    finally:
        backend.close()


def test_announcement_style_handler_with_settings(make_proxy, echo_backend):
    handlers = custom_registry(slow=announcement_style_delay)
    handlers['slow'].settings = handlers['slow'].validate({'sleep': '0.2'})
    proxy = make_proxy(echo_backend.address, handlers=handlers, behavior='100:slow')
    started = time.monotonic()
    assert round_trip(proxy.address) == b'ping'
    assert time.monotonic() - started >= 0.2


# ---------------------------------------------------------------------------
# Choosing a handler: the mix, the seed, live switches
# ---------------------------------------------------------------------------

def test_mix_proportions_under_a_seed():
    handlers = vaurien.default_handlers()
    mix = vaurien.Behavior('20:delay,10:errors,2.5:hang', handlers)
    assert str(mix) == '20:delay,10:errors,2.5:hang,67.5:normal'
    rng = random.Random(7)
    draws = [mix.draw(rng) for _ in range(20000)]
    share = {name: draws.count(name) / len(draws) for name in set(draws)}
    assert abs(share['delay'] - 0.20) < 0.015
    assert abs(share['errors'] - 0.10) < 0.015
    assert abs(share['hang'] - 0.025) < 0.01
    assert abs(share['normal'] - 0.675) < 0.015
    again = random.Random(7)
    assert draws == [mix.draw(again) for _ in range(20000)]


def connection_fates(proxy, count):
    fates = []
    for _ in range(count):
        with connect(proxy.address) as sock:
            sock.sendall(b'x')
            sock.shutdown(socket.SHUT_WR)
            fates.append('normal' if outcome(sock)[1] == b'x' else 'blackout')
    return fates


def test_seeded_draws_are_reproducible_and_kept_per_connection(make_proxy, echo_backend):
    first = connection_fates(make_proxy(echo_backend.address, behavior='50:blackout',
                                        seed=42), 40)
    second = connection_fates(make_proxy(echo_backend.address, behavior='50:blackout',
                                         seed=42), 40)
    mix = vaurien.Behavior('50:blackout', vaurien.default_handlers())
    rng = random.Random(42)
    assert first == second == [mix.draw(rng) for _ in range(40)]
    assert 10 < first.count('blackout') < 30


def test_bad_behaviors_are_refused_with_the_reason():
    handlers = vaurien.default_handlers()
    cases = {'60:delay,50:errors': 'over 100', '20:nope': "unknown handler 'nope'",
             'delay': 'malformed', '20:': 'malformed', 'x:delay': 'malformed',
             '0:delay': 'above 0', '-5:delay': 'above 0', '': 'empty',
             'nan:delay': 'above 0', '200:delay': 'at most 100'}
    for spec, reason in cases.items():
        with pytest.raises(vaurien.ConfigError, match=reason):
            vaurien.Behavior(spec, handlers)
    with pytest.raises(vaurien.ConfigError, match='known: abort, bandwidth'):
        vaurien.Behavior('20:nope', handlers)


def test_a_handler_set_reaches_live_connections_from_their_next_chunk(proxy):
    client = Client(*proxy.control)
    with connect(proxy.address) as sock:
        sock.sendall(b'one')
        assert read_exactly(sock, 3) == b'one'
        with client.with_handler('errors', message='down'):
            sock.sendall(b'two')
            assert outcome(sock) == ('eof', b'down')
    assert round_trip(proxy.address) == b'ping'


def test_with_handler_restores_handler_settings_or_mix_even_on_error(proxy):
    client = Client(*proxy.control)
    client.set_handler('delay', sleep=0.01, jitter=0.005)
    before = client.get_handler()
    with pytest.raises(KeyError):
        with client.with_handler('errors', status=502):
            assert client.get_handler()['settings']['status'] == 502
            raise KeyError('inside')
    assert client.get_handler() == before
    client.set_behavior('20:delay,10:hang')
    with client.with_handler('blackout'):
        assert client.get_handler()['handler'] == 'blackout'
    assert client.get_handler() == {'handler': None, 'settings': {}, 'fixed': False,
                                    'behavior': '20:delay,10:hang,70:normal'}


def test_proxy_in_process_drives_like_the_client(proxy):
    with proxy.with_handler('errors', message='nope'):
        with connect(proxy.address) as sock:
            sock.sendall(b'hi')
            assert outcome(sock) == ('eof', b'nope')
    assert proxy.get_handler()['handler'] == 'normal'
    assert round_trip(proxy.address) == b'ping'


# ---------------------------------------------------------------------------
# Control API
# ---------------------------------------------------------------------------

def api(address, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_api_get_and_set_handler(proxy):
    address = proxy.control
    assert api(address, 'GET', '/handler') == (200, {
        'handler': 'normal', 'settings': {}, 'behavior': '100:normal', 'fixed': False})
    status, state = api(address, 'PUT', '/handler',
                        json.dumps({'name': 'delay', 'settings': {'sleep': 0.5}}))
    assert status == 200 and state['handler'] == 'delay'
    assert state['settings'] == {'sleep': 0.5, 'jitter': 0.0, 'direction': 'to_backend'}
    assert api(address, 'POST', '/handler', 'errors')[1]['handler'] == 'errors'
    assert api(address, 'GET', '/handler')[1]['handler'] == 'errors'


def test_api_settings_merge_over_the_configured_ones(make_proxy, echo_backend):
    handlers = vaurien.default_handlers()
    handlers['delay'].settings = handlers['delay'].validate({'sleep': 2, 'jitter': 0.5})
    proxy = make_proxy(echo_backend.address, handlers=handlers, http=True)
    status, state = api(proxy.control, 'PUT', '/handler',
                        json.dumps({'name': 'delay', 'settings': {'sleep': 0.1}}))
    assert state['settings'] == {'sleep': 0.1, 'jitter': 0.5, 'direction': 'to_backend'}


def test_api_curl_plain_text_body(proxy):
    if not shutil.which('curl'):
        pytest.skip('curl is not installed (apt-get install curl)')
    url = 'http://%s:%d/handler' % proxy.control
    out = subprocess.run(['curl', '-s', '-d', 'errors', url], capture_output=True, text=True,
                         timeout=WAIT).stdout
    assert json.loads(out)['handler'] == 'errors'


def test_api_handlers_and_behavior(proxy):
    address = proxy.control
    status, listing = api(address, 'GET', '/handlers')
    assert status == 200 and listing['handlers'] == sorted(listing['handlers'])
    assert {'normal', 'delay', 'errors', 'hang', 'blackout'} <= set(listing['handlers'])
    assert listing['details']['delay']['settings']['sleep']['default'] == 1.0
    assert api(address, 'GET', '/behavior') == (200, {'behavior': '100:normal'})
    assert api(address, 'PUT', '/behavior', json.dumps({'behavior': '20:delay'})) == (
        200, {'behavior': '20:delay,80:normal'})
    assert api(address, 'GET', '/handler')[1]['handler'] is None


@pytest.mark.parametrize('method,path,body,status,fragment', [
    ('PUT', '/handler', '{"name": "nope"}', 400, 'unknown handler'),
    ('PUT', '/handler', 'nope', 400, 'unknown handler'),
    ('PUT', '/handler', '{"name": ', 400, 'malformed JSON'),
    ('PUT', '/handler', '[1, 2]', 400, 'JSON object'),
    pytest.param('PUT', '/handler', '[' * 60000, 400, 'malformed JSON: nested too deeply',
                 id='deep-json'),
    pytest.param('PUT', '/proxy', '{"local": "%s:0"}' % ('a' * 64), 400, 'local: ' + 'a' * 64
                 + ' is no host name', id='64-character-label'),
    ('PUT', '/handler', '{"name": "delay", "settings": {"sleep": "soon"}}', 400, 'sleep'),
    ('PUT', '/handler', '{"name": "delay", "settings": {"slep": 1}}', 400, 'unknown setting'),
    ('PUT', '/handler', '{"name": "delay", "settings": [1]}', 400, 'settings'),
    ('PUT', '/handler', '{}', 400, 'name'),
    ('PUT', '/behavior', '{"behavior": "90:delay,20:hang"}', 400, 'over 100'),
    ('PUT', '/behavior', '{"behavior": 5}', 400, 'behavior'),
    ('GET', '/nowhere', None, 404, "no such resource '/nowhere' (try /handler, /handlers, "
                                  '/behavior, /proxy, /stats, /events, /connections, /metrics, '
                                  '/faults, /proxies)'),
    ('DELETE', '/handler', None, 405, 'does not take DELETE'),
    ('PUT', '/handlers', '{}', 405, 'does not take PUT'),
    ('PUT', '/proxy', '{"enabled": "maybe"}', 400, 'enabled'),
])
def test_api_errors_are_json_with_the_right_status(proxy, method, path, body, status,
                                                  fragment):
    got_status, answer = api(proxy.control, method, path, body)
    assert got_status == status and answer['status'] == status
    assert fragment in answer['error']
    assert api(proxy.control, 'GET', '/handler')[0] == 200


def test_api_unknown_handler_lists_the_known_ones_and_never_imports(proxy):
    status, answer = api(proxy.control, 'PUT', '/handler',
                         json.dumps({'name': 'os.system'}))
    assert status == 400 and 'normal' in answer['known']


def test_api_body_over_64k_gets_413_not_a_reset(proxy):
    with connect(proxy.control) as sock:
        body = b'x' * (70 * 1024)
        sock.sendall(b'PUT /handler HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n'
                     % len(body))
        for start in range(0, len(body), 8192):   # the body keeps coming, in segments
            with contextlib.suppress(OSError):
                sock.sendall(body[start:start + 8192])
            time.sleep(0.005)
        kind, data = outcome(sock)
    assert kind == 'eof'
    assert data.startswith(b'HTTP/1.1 413 ')
    assert json.loads(data.partition(b'\r\n\r\n')[2])['status'] == 413


def test_api_refuses_browsers_and_checks_the_token(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, http=True, http_token='s3cret')
    address = proxy.control
    auth = {'Authorization': 'Bearer s3cret'}
    assert api(address, 'GET', '/handler')[0] == 401
    assert api(address, 'GET', '/handler', headers={'Authorization': 'Bearer nope'})[0] == 401
    assert api(address, 'GET', '/handler', headers=auth)[0] == 200
    assert api(address, 'GET', '/handler', headers=dict(auth, Origin='http://evil.test'))[0] == 403
    browser = 'Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36'
    assert api(address, 'GET', '/handler', headers=dict(auth, **{'User-Agent': browser}))[0] \
        == 403
    assert Client(*address, token='s3cret').get_handler()['handler'] == 'normal'
    with pytest.raises(vaurien.VaurienError, match='401'):
        Client(*address).get_handler()


def test_api_half_sent_request_does_not_block_it(proxy):
    with connect(proxy.control) as stalled:
        stalled.sendall(b'PUT /handler HTTP/1.1\r\nContent-Length: 10\r\n\r\nerr')
        started = time.monotonic()
        assert Client(*proxy.control).get_handler()['handler'] == 'normal'
        assert time.monotonic() - started < 2


def test_client_errors_say_what_happened():
    spare = socket.create_server((LOOP, 0))
    port = spare.getsockname()[1]
    spare.close()
    with pytest.raises(vaurien.VaurienError, match='refused.*--http'):
        Client(LOOP, port).get_handler()


def test_client_error_answers_raise(proxy):
    client = Client(*proxy.control)
    with pytest.raises(vaurien.VaurienError, match="400 unknown handler 'nope'"):
        client.set_handler('nope')
    with pytest.raises(vaurien.VaurienError, match='unknown setting'):
        client.set_handler('delay', name_of_nothing=1)


def test_a_setting_called_name_does_not_collide(make_proxy, echo_backend):
    def named(source, dest, to_backend, name, settings, proxy):
        """Sends its `name` setting.

        Settings:
          name (str, default x): what it says.
        """
        dest.sendall(settings['name'].encode())
        return False
    proxy = make_proxy(echo_backend.address, http=True,
                       handlers=custom_registry(named=named))
    assert Client(*proxy.control).set_handler('named', name='y')['settings'] == \
        {'name': 'y'}
    assert proxy.set_handler('named', name='z')['settings'] == {'name': 'z'}


def test_client_keeps_working_after_the_server_closed_its_idle_connection(proxy):
    client = Client(*proxy.control)
    client.get_handler()
    client._http.sock.close()    # as if the server had timed the idle connection out
    client._http.sock = None
    assert client.get_handler()['handler'] == 'normal'


# ---------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_gives_handler_settings_and_options(tmp_path, echo_backend, cli_proxy):
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:delay\n'
                '[handler:delay]\nsleep = 0.3\n' % echo_backend.address)
    proc = cli_proxy('--config', ini)
    started = time.monotonic()
    assert round_trip(proc.address) == b'ping'
    assert time.monotonic() - started >= 0.3
    state = Client(*proc.control).get_handler()
    assert state['settings'] == {'sleep': 0.3, 'jitter': 0.0, 'direction': 'to_backend'}
    assert 'handler delay configured by %s: [handler:delay] (sleep=0.3, jitter=0.0, ' \
           'direction=to_backend)' % ini in ''.join(proc.lines)


def test_command_line_flags_override_the_config_file(tmp_path, echo_backend, cli_proxy):
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:blackout\n'
                % echo_backend.address)
    proc = cli_proxy('--config', ini, '--behavior', '100:normal')
    assert round_trip(proc.address) == b'ping'


def test_custom_handler_registered_by_dotted_name(tmp_path, echo_backend, cli_proxy):
    (tmp_path / 'mychaos.py').write_text(
        'def upper(source, dest, to_backend, name, settings, proxy):\n'
        '    data = proxy.get_data(source)\n'
        '    if data and not to_backend:\n'
        '        data = data.upper() + settings["suffix"].encode()\n'
        '    dest.sendall(data)\n')
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:shout\n'
                '[handler:shout]\ncallable = mychaos:upper\nsuffix = !\n' % echo_backend.address)
    proc = cli_proxy('--config', ini)   # the config file's directory is importable
    assert round_trip(proc.address, b'hey') == b'HEY!'
    ini2 = write(tmp_path, 'w.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:shout\n'
                 '[handler:shout]\ncallable = mychaos.upper\nsuffix = ?\n' % echo_backend.address)
    other = tmp_path / 'elsewhere'
    other.mkdir()
    proc = cli_proxy('--config', ini2, cwd=str(other))
    assert round_trip(proc.address, b'hey') == b'HEY?'


CONFIG_ERRORS = [
    ('[vaurien]\ndistant = a:1\nbogus = 1\n', "[vaurien]: unknown key 'bogus'"),
    ('[vaurien]\ndistant = a:1\nhttp_port = lots\n', '[vaurien] http_port = lots: expected int'),
    ('[vaurien]\ndistant = a:1\nhttp_port = 70000\n', 'http_port = 70000'),
    ('[vaurien]\ndistant = a:1\nbehavior = 120:delay\n', 'behavior = 120:delay: '),
    ('[vaurien]\ndistant = a:1\nbehavior = 60:delay,60:hang\n', 'over 100'),
    ('[vaurien]\ndistant = a:1\nbehavior = 20:nope\n', "unknown handler 'nope'"),
    ('[vaurien]\ndistant = a:1\nlog_level = loud\n', 'log_level = loud: expected one of'),
    ('[whatever]\nx = 1\n', '[whatever]: unknown section'),
    ('[handler:delay]\nsleep = soon\n', '[handler:delay] sleep = soon: '),
    ('[handler:delay]\nsleep = -1\n', 'sleep = -1'),
    ('[handler:delay]\nslep = 1\n', "unknown setting 'slep'"),
    ('[handler:mine]\nx = 1\n', "unknown handler 'mine'"),
    ('[handler:mine]\ncallable = no_such_module.func\n', 'cannot import no_such_module'),
    ('[handler:mine]\ncallable = os.path.nothing_here\n', 'has no attribute'),
    ('[handler:mine]\ncallable = os.sep\n', 'not callable'),
    ('[handler:mine]\ncallable = justaname\n', 'not a dotted name'),
    ('[vaurien]\ndistant = a:1\n[vaurien]\n', 'appears twice'),
    ('[vaurien]\ndistant = a:1\ndistant = b:2\n', 'appears twice'),
    ('distant = a:1\n', 'comes before any [section]'),
    ('[vaurien\n', 'line 1'),
    ('[vaurien]\nthis line has no equals sign\n', 'line 2: cannot parse'),
]


@pytest.mark.parametrize('text,message', CONFIG_ERRORS)
def test_config_errors_are_one_line_with_exit_status_2(tmp_path, text, message):
    ini = write(tmp_path, 'bad.ini', text)
    result = run_cli('--config', ini, '--distant', '127.0.0.1:9')
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('vaurien: error: %s' % ini)
    assert message in lines[0]
    assert 'Traceback' not in result.stderr


def test_missing_and_binary_config_files(tmp_path):
    result = run_cli('--config', str(tmp_path / 'none.ini'))
    assert result.returncode == 2 and 'cannot read' in result.stderr
    binary = tmp_path / 'bin.ini'
    binary.write_bytes(b'\xff\xfe\x00garbage')
    result = run_cli('--config', str(binary))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('args,message', [
    (['--distant', 'nowhere'], '--distant = nowhere: expected HOST:PORT'),
    (['--distant', 'a:1', '--local', 'x:99999'], '--local = x:99999: expected HOST:PORT'),
    (['--distant', 'a:1', '--http-port', 'inf'], '--http-port = inf: expected int'),
    (['--distant', 'a:1', '--seed', 'nan'], '--seed = nan: expected int'),
    (['--distant', 'a:1', '--http', '--http-host', 'no-such-host.invalid'],
     'cannot resolve no-such-host.invalid'),
    (['--distant', 'a:1', '--behavior', '50:delay,60:hang'], 'over 100'),
    (['--distant', 'a:1', '--http-port', '-3'], '--http-port = -3'),
    (['--distant', 'a:1', '--seed', 'abc'], '--seed = abc'),
    ([], 'no backend'),
])
def test_bad_command_line_values_are_one_line_errors(args, message):
    result = run_cli('--local', LOOP + ':0', *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_listen_failure_is_one_line():
    taken = socket.create_server((LOOP, 0))
    where = '%s:%d' % taken.getsockname()
    try:
        result = run_cli('--local', where, '--distant', 'a:1')
    finally:
        taken.close()
    assert result.returncode == 1 and 'in use' in result.stderr
    assert 'cannot listen on %s: ' % where in result.stderr
    assert "give port 0 for a free port, as local='HOST:0' or --local HOST:0" in result.stderr
    assert 'Traceback' not in result.stderr


def test_version_help_and_list_handlers():
    assert run_cli('--version').stdout.strip() == 'vaurien ' + vaurien.__version__
    helptext = run_cli('--help').stdout
    for flag in ('--local', '--distant', '--behavior', '--config', '--seed', '--http ',
                 '--http-host', '--http-port', '--log-level', '--log-output',
                 '--list-handlers', '--version', '--demo', 'vaurien toxiproxy [-host'):
        assert flag in ' '.join(helptext.split())
    listing = run_cli('--list-handlers').stdout
    assert 'delay: Delays each chunk' in listing
    assert 'sleep (seconds >= 0, default 1.0): seconds each chunk is held.' in listing
    assert 'Units: a setting of type seconds' in listing
    assert 'blackout: Closes the connection at once' in listing


def test_python_dash_m_and_the_console_entry_point(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'vaurien', '--version'], cwd=HERE,
                            capture_output=True, text=True, timeout=WAIT)
    assert result.stdout.strip() == 'vaurien ' + vaurien.__version__
    with open(os.path.join(HERE, 'setup.py')) as setup:
        assert "'vaurien=vaurien:main'" in setup.read()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_proxy_with_status_0_within_a_second(cli_proxy, echo_backend, signum):
    proc = cli_proxy('--distant', '%s:%d' % echo_backend.address)
    live = connect(proc.address)
    live.sendall(b'x')
    assert read_exactly(live, 1) == b'x'
    started = time.monotonic()
    proc.process.send_signal(signum)
    assert proc.process.wait(WAIT) == 0
    assert time.monotonic() - started < 3   # a second, plus a loaded machine's margin
    assert outcome(live)[0] in ('eof', 'rst')
    live.close()
    with pytest.raises(OSError):
        connect(proc.address).close()


def test_log_output_to_a_file(tmp_path, cli_proxy, dead_port):
    logfile = tmp_path / 'v.log'
    proc = cli_proxy('--distant', '%s:%d' % (LOOP, dead_port), '--log-output', str(logfile), '--log-level', 'debug')
    with connect(proc.address) as sock:
        outcome(sock)
    wait_for(lambda: logfile.exists() and 'unreachable' in logfile.read_text(),
             what='the log line in the file')


# ---------------------------------------------------------------------------
# start_proxy / stop_proxy and the announcement's example
# ---------------------------------------------------------------------------

def test_start_proxy_is_ready_on_return_and_stop_proxy_stops_it(echo_backend):
    pid = start_proxy(host=LOOP, port=echo_backend.address[1], local=LOOP + ':0',
                      http_host=LOOP, http_port=0)
    try:
        client = Client()       # the proxy start_proxy() just started
        assert client.get_handler()['handler'] == 'normal'
        with client.with_handler('errors', message='E'):
            proxied = vaurien.parse_address(client.status()['local'])
            with connect(proxied) as sock:
                sock.sendall(b'x')
                assert outcome(sock) == ('eof', b'E')
        assert round_trip(proxied) == b'ping'
    finally:
        assert stop_proxy(pid) is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        connect(proxied).close()
    with pytest.raises(ValueError):
        stop_proxy(pid)


def test_start_proxys_child_runs_this_file_from_its_cached_bytecode(tmp_path, monkeypatch,
                                                                     echo_backend):
    """As ``python3 vaurien.py`` would, but a script is compiled anew at each start
    (half of the start time): a copy of vaurien.py, started, leaves its bytecode."""
    shutil.copy(VAURIEN, tmp_path / 'vaurien.py')
    (tmp_path / 'near.py').write_text(NEAR_HANDLER)     # found beside it, as a script's
    (tmp_path / 'near.ini').write_text('[handler:reverse]\ncallable = near.reverse\n')
    monkeypatch.setattr(sys, 'dont_write_bytecode', True)   # the bytecode is the child's
    copy = load_module_from(tmp_path / 'vaurien.py', 'vaurien_copy')
    monkeypatch.delenv('PYTHONDONTWRITEBYTECODE', raising=False)
    with copy.start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                          config=str(tmp_path / 'near.ini'), behavior='100:reverse',
                          http_host=LOOP, http_port=0, echo=False) as handle:
        assert round_trip(handle.local) == b'gnip'
    assert list((tmp_path / '__pycache__').glob('vaurien.*.pyc'))


@pytest.mark.parametrize('how', ['symlinked', 'safe_path'])
def test_start_proxys_child_finds_handlers_as_python3_vaurien_py_would(tmp_path, monkeypatch,
                                                                       echo_backend, how):
    """Beside the file a symlinked vaurien.py points to; on PYTHONPATH, with
    PYTHONSAFEPATH (Python 3.11+: no script folder on sys.path, and no entry lost)."""
    real, link = tmp_path / 'real', tmp_path / 'link'
    real.mkdir()
    link.mkdir()
    shutil.copy(VAURIEN, real / 'vaurien.py')
    (link / 'vaurien.py').symlink_to(real / 'vaurien.py')
    (tmp_path / 'near.ini').write_text('[handler:reverse]\ncallable = near.reverse\n')
    if how == 'symlinked':
        (real / 'near.py').write_text(NEAR_HANDLER)
    else:
        (tmp_path / 'path').mkdir()
        (tmp_path / 'path' / 'near.py').write_text(NEAR_HANDLER)
        monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'path'))
        monkeypatch.setenv('PYTHONSAFEPATH', '1')
    copy = load_module_from(link / 'vaurien.py', 'vaurien_link')
    with copy.start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                          config=str(tmp_path / 'near.ini'), behavior='100:reverse',
                          http_host=LOOP, http_port=0, echo=False) as handle:
        assert round_trip(handle.local) == b'gnip'


NEAR_HANDLER = """
def reverse(source, dest, to_backend, name, settings, proxy):
    data = proxy.get_data(source)
    dest.sendall(data[::-1] if to_backend else data)
"""


def load_module_from(path, name):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_start_proxy_failure_raises_with_the_error_output():
    with pytest.raises(vaurien.VaurienError, match='over 100'):
        start_proxy(port=9, local=LOOP + ':0', http_port=0, behavior='90:delay,90:hang')


def test_start_proxy_refuses_an_option_it_does_not_know_as_a_call_does():
    with pytest.raises(TypeError, match=r"unknown option 'behaviour' \(did you mean "
                                        r"behavior\?\)"):
        start_proxy(port=9, local=LOOP + ':0', http_port=0, behaviour='20:delay')
    with pytest.raises(TypeError, match="unknown option 'exit_on_eof'"):   # start_proxy's
        start_proxy(port=9, local=LOOP + ':0', http_port=0, exit_on_eof=True)


def test_stop_proxy_unknown_pid():
    with pytest.raises(ValueError):
        stop_proxy(1)


def test_the_announcement_example_runs(monkeypatch):
    """examples/test_announcement.py, as written, with its ports made ephemeral."""
    import unittest
    sys.path.insert(0, os.path.join(HERE, 'examples'))
    try:
        import test_announcement
    finally:
        sys.path.pop(0)

    def ephemeral_start_proxy(**options):
        return start_proxy(local=LOOP + ':0', http_port=0, **options)
    monkeypatch.setattr(test_announcement, 'start_proxy', ephemeral_start_proxy)
    suite = unittest.defaultTestLoader.loadTestsFromModule(test_announcement)
    result = unittest.TextTestRunner(stream=open(os.devnull, 'w')).run(suite)
    assert result.wasSuccessful(), result.errors + result.failures
    assert result.testsRun >= 1


# ---------------------------------------------------------------------------
# The fault library
# ---------------------------------------------------------------------------

def reply_backend(reply, close=True):
    """Answers each connection's first chunk with `reply`, then half-closes (if `close`)."""
    def serve(sock):
        backend.requests.append(sock.recv(65536))
        sock.sendall(reply)
        if close:
            sock.shutdown(socket.SHUT_WR)
        read_all(sock)
    backend = Backend(serve)
    backend.requests = []
    return backend


@pytest.fixture
def backends():
    made = []

    def make(factory, *args):
        made.append(factory(*args))
        return made[-1]
    yield make
    for backend in made:
        backend.close()


def test_delay_jitter_and_direction(make_proxy, backends):
    backend = backends(timestamped_backend)
    proxy = make_proxy(backend.address)
    proxy.set_handler('delay', sleep=1.0, direction='to_client')
    with connect(proxy.address) as sock:
        sent = time.monotonic()
        sock.sendall(b'ping')
        assert read_exactly(sock, 4) == b'pong'
        assert backend.arrivals[0][0] - sent < 0.9           # requests go at once
        assert time.monotonic() - backend.arrivals[0][0] >= 0.99   # replies wait
    proxy.set_handler('delay', sleep=0.2, jitter=0.1, direction='both')
    with connect(proxy.address) as sock:
        for _ in range(3):
            sent = time.monotonic()
            sock.sendall(b'ping')
            assert read_exactly(sock, 4) == b'pong'
            assert time.monotonic() - sent >= 0.2   # two legs of at least 0.1 s


@pytest.mark.parametrize('request_bytes,answer', [
    (b'*1\r\n$4\r\nPING\r\n', b'-ERR Service Unavailable\r\n'),
    (b'PING\r\n', b'-ERR Service Unavailable\r\n'),
    (b'get foo\r\n', b'SERVER_ERROR Service Unavailable\r\n'),
    (b'set foo 0 0 3\r\nbar\r\n', b'SERVER_ERROR Service Unavailable\r\n'),
])
def test_errors_auto_detects_redis_and_memcache(make_proxy, echo_backend, request_bytes,
                                                answer):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    with connect(proxy.address) as sock:
        sock.sendall(request_bytes)
        assert outcome(sock) == ('eof', answer)


def test_errors_mysql_greeting_without_waiting_or_a_backend(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', protocol='mysql')
    with connect(proxy.address) as sock:
        kind, data = outcome(sock)
    message = b'Too many connections'
    assert kind == 'eof'
    assert data == struct.pack('<I', 3 + len(message))[:3] + b'\x00\xff' + \
        struct.pack('<H', 1040) + message
    assert echo_backend.accepted == 0
    pymysql = pytest.importorskip('pymysql')
    with pytest.raises(pymysql.err.OperationalError) as caught:
        pymysql.connect(host=LOOP, port=proxy.address[1], user='x', connect_timeout=WAIT)
    assert caught.value.args == (1040, 'Too many connections')


def test_errors_mysql_command_line_client(make_proxy, echo_backend):
    client = shutil.which('mariadb') or shutil.which('mysql')
    if not client:
        pytest.skip('no MySQL client (apt-get install mariadb-client)')
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', protocol='mysql', code='1045', message='Access denied')
    result = subprocess.run([client, '-h', LOOP, '-P', str(proxy.address[1]), '-u', 'x',
                             '--skip-ssl'], capture_output=True, text=True, timeout=WAIT,
                            stdin=subprocess.DEVNULL)
    assert 'ERROR 1045' in result.stderr and 'Access denied' in result.stderr


def test_errors_postgresql_answers_ssl_then_a_fatal_error(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    with connect(proxy.address) as sock:
        sock.sendall(struct.pack('!II', 8, 80877103))
        assert read_exactly(sock, 1) == b'N'
        params = b'user\x00x\x00database\x00x\x00\x00'
        sock.sendall(struct.pack('!II', 8 + len(params), 196608) + params)
        kind, data = outcome(sock)
    assert kind == 'eof' and data.startswith(b'E')
    assert struct.unpack('!I', data[1:5])[0] == len(data) - 1
    fields = dict((f[:1], f[1:]) for f in data[5:-1].split(b'\x00') if f)
    assert fields == {b'S': b'FATAL', b'V': b'FATAL', b'C': b'53300',
                      b'M': b'sorry, too many clients already'}


def test_errors_postgresql_clients_report_it(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', protocol='postgresql', code='57P03',
                      message='the database system is starting up')
    pg8000 = pytest.importorskip('pg8000')
    with pytest.raises(pg8000.dbapi.ProgrammingError) as caught:
        pg8000.connect(host=LOOP, port=proxy.address[1], user='x', timeout=WAIT)
    assert caught.value.args[0]['C'] == '57P03'
    if not shutil.which('psql'):
        pytest.skip('psql is not installed (apt-get install postgresql-client)')
    result = subprocess.run(['psql', '-h', LOOP, '-p', str(proxy.address[1]), '-U', 'x',
                             '-c', 'select 1'], capture_output=True, text=True, timeout=WAIT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert 'FATAL:  the database system is starting up' in result.stderr


def test_errors_redis_clients_report_it(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    redis = pytest.importorskip('redis')
    with pytest.raises(redis.exceptions.ResponseError, match='Service Unavailable'):
        redis.Redis(host=LOOP, port=proxy.address[1], socket_timeout=WAIT, protocol=3).ping()
    if not shutil.which('redis-cli'):
        pytest.skip('redis-cli is not installed (apt-get install redis-tools)')
    proxy.set_handler('errors', message='LOADING Redis is loading the dataset in memory')
    result = subprocess.run(['redis-cli', '-h', LOOP, '-p', str(proxy.address[1]), 'GET', 'k'],
                            capture_output=True, text=True, timeout=WAIT)
    assert 'LOADING Redis is loading the dataset in memory' in result.stdout


def test_errors_smtp_greeting(make_proxy, echo_backend):
    import smtplib
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', protocol='smtp')
    with pytest.raises(smtplib.SMTPConnectError) as caught:
        smtplib.SMTP(LOOP, proxy.address[1], timeout=WAIT)
    assert caught.value.smtp_code == 421


def test_errors_http_with_curl(make_proxy, echo_backend):
    if not shutil.which('curl'):
        pytest.skip('curl is not installed (apt-get install curl)')
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', status=504)
    result = subprocess.run(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}',
                             'http://%s:%d/api' % proxy.address], capture_output=True,
                            text=True, timeout=WAIT)
    assert result.stdout == '504' and result.returncode == 0


def test_abort_resets_the_client_after_the_request_reached_the_backend(make_proxy, backends):
    backend = backends(reply_backend, b'reply')
    proxy = make_proxy(backend.address)
    proxy.set_handler('abort')
    with connect(proxy.address) as sock:
        sock.sendall(b'request')
        assert outcome(sock) == ('rst', b'')
    wait_for(lambda: backend.requests == [b'request'], what='the request at the backend')


@pytest.mark.parametrize('as_fault', [False, True])
@pytest.mark.parametrize('direction', ['to_backend', 'to_client'])
def test_reset_peer_resets_both_ends_whichever_direction_sets_it_off(make_proxy, direction,
                                                                      as_fault):
    ends = []

    def serve(sock):   # echoes the first chunk, if any, and says how its connection ended
        try:
            sock.sendall(sock.recv(100))
        except ConnectionResetError:
            return ends.append('rst')
        ends.append(outcome(sock)[0])
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        if as_fault:
            proxy.add_fault('reset_peer', direction=direction, timeout=0.1)
        else:
            proxy.set_handler('reset_peer', direction=direction, timeout=0.1)
        with connect(proxy.address) as sock:
            sock.sendall(b'hi')
            assert outcome(sock) == ('rst', b'')   # what set it off was dropped
        wait_for(lambda: ends, what='the backend to see its end')
        assert ends == ['rst']
    finally:
        backend.close()


def test_abort_on_response_and_on_connect(make_proxy, backends):
    backend = backends(reply_backend, b'reply', False)
    proxy = make_proxy(backend.address)
    proxy.set_handler('abort', when='response')
    with connect(proxy.address) as sock:
        sock.sendall(b'request')
        assert outcome(sock) == ('rst', b'')
    assert backend.requests == [b'request']
    proxy.set_handler('abort', when='connect')
    try:
        with connect(proxy.address) as sock:
            assert outcome(sock) == ('rst', b'')
    except ConnectionResetError:   # the reset can beat connect()'s return
        pass
    assert backend.accepted == 1


def test_bandwidth_is_smooth_and_close_to_the_rate(make_proxy, backends):
    payload = os.urandom(300000)
    backend = backends(reply_backend, payload)
    proxy = make_proxy(backend.address)
    rate = 300000
    proxy.set_handler('bandwidth', rate=rate)
    with connect(proxy.address) as sock:
        sock.sendall(b'go')
        started, got, received = time.monotonic(), 0, []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received.append(data)
            got += len(data)
            # never ahead of the rate by more than a tenth of a second of traffic
            assert got <= rate * (time.monotonic() - started) + rate / 10 + 1
    assert b''.join(received) == payload
    assert time.monotonic() - started >= 0.85


@pytest.mark.parametrize('how', ['handler', 'fault'])
def test_bandwidth_holds_small_chunks_that_come_one_at_a_time_to_the_rate(make_proxy,
                                                                          echo_backend, how):
    """Each chunk's pause holds the next one, also when it comes after the queue emptied:
    64 B every 5 ms (12,800 B/s) through 1,000 B/s."""
    proxy = make_proxy(echo_backend.address)
    if how == 'handler':
        proxy.set_handler('bandwidth', rate=1000, direction='to_backend')
    else:
        proxy.add_fault('bandwidth', rate=1000, direction='to_backend')
    with connect(proxy.address) as sock:
        sock.settimeout(0.005)
        started, got = time.monotonic(), 0
        while time.monotonic() - started < 1:
            sock.sendall(b'x' * 64)
            with contextlib.suppress(socket.timeout):
                got += len(sock.recv(65536))
            # never ahead of the rate by more than a tenth of a second, and a chunk
            assert got <= 1000 * (time.monotonic() - started) + 100 + 64


def test_slicer_splits_and_keeps_every_byte_in_order(make_proxy, backends):
    payload = bytes(range(256)) * 4
    backend = backends(reply_backend, payload)
    proxy = make_proxy(backend.address)
    proxy.set_handler('slicer', size=16, variation=4, delay=0.005)
    with connect(proxy.address) as sock:
        sock.sendall(b'go')
        started, pieces = time.monotonic(), []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            pieces.append(data)
    assert b''.join(pieces) == payload
    assert len(pieces) >= 10
    assert time.monotonic() - started >= (1024 / 20 - 1) * 0.005


def test_slow_close_holds_the_eof(make_proxy, backends):
    backend = backends(reply_backend, b'bye')
    proxy = make_proxy(backend.address)
    proxy.set_handler('slow_close', delay=1.5)
    with connect(proxy.address) as sock:
        sock.sendall(b'hi')
        started = time.monotonic()
        assert read_exactly(sock, 3) == b'bye'
        assert time.monotonic() - started < 1.2
        assert read_all(sock) == b''
        assert time.monotonic() - started >= 1.5


def test_timeout_swallows_and_closes_after_the_timeout(make_proxy, backends):
    backend = backends(timestamped_backend)
    proxy = make_proxy(backend.address)
    proxy.set_handler('timeout', timeout=0.5)
    started = time.monotonic()     # before connect: the proxy may arm its clock first
    with connect(proxy.address) as sock:
        sock.sendall(b'ping')
        assert outcome(sock) == ('eof', b'')
        assert time.monotonic() - started >= 0.5
    assert backend.arrivals == []
    proxy.set_handler('timeout', timeout=0)
    with connect(proxy.address) as sock:
        sock.sendall(b'ping')
        assert outcome(sock, deadline=1.0) == ('open', b'')


def test_limit_data_relays_that_many_bytes_then_closes(make_proxy, backends):
    backend = backends(reply_backend, b'x' * 1000, False)
    proxy = make_proxy(backend.address)
    proxy.set_handler('limit_data', bytes=100)
    with connect(proxy.address) as sock:
        sock.sendall(b'go')
        assert outcome(sock) == ('eof', b'x' * 100)
    proxy.set_handler('limit_data', bytes=3, direction='to_backend')
    with connect(proxy.address) as sock:
        sock.sendall(b'abcdef')
        assert outcome(sock)[0] == 'eof'
    wait_for(lambda: backend.requests[-1:] == [b'abc'], what='three bytes at the backend')


def test_transient_fails_the_first_connections_then_passes(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('transient', count=2)
    assert [round_trip(proxy.address, b'GET / HTTP/1.0\r\n\r\n')[:12] for _ in range(4)] == \
        [b'HTTP/1.1 503', b'HTTP/1.1 503', b'GET / HTTP/1', b'GET / HTTP/1']
    proxy.set_handler('transient', count=0, period=0.5, protocol='redis')
    assert round_trip(proxy.address, b'*1\r\n$4\r\nPING\r\n').startswith(b'-ERR')
    time.sleep(0.6)
    assert round_trip(proxy.address, b'*1\r\n$4\r\nPING\r\n') == b'*1\r\n$4\r\nPING\r\n'


def test_transient_mysql_greeting(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('transient', count=1, protocol='mysql')
    with connect(proxy.address) as sock:
        assert outcome(sock)[1][4:5] == b'\xff'
    assert round_trip(proxy.address) == b'ping'


def test_flap_alternates_service_and_outage(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('flap', up=1.0, down=1.0)
    started = proxy.epoch[1]

    def at(moment):
        time.sleep(max(0.0, started + moment - time.monotonic()))
        try:
            with connect(proxy.address) as sock:
                sock.sendall(b'x')
                return outcome(sock, deadline=0.5)
        except ConnectionResetError:     # so soon that connect() or sendall() saw it
            return 'rst', b''
    assert at(0.0)[1] == b'x'
    assert at(1.3)[0] == 'rst'
    assert at(2.3)[1] == b'x'


def test_flap_refuse_closes_the_listener_during_the_outage(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('flap', up=1.0, down=1.5, mode='refuse')   # up long enough to find
    time.sleep(max(0.0, proxy.epoch[1] + 1.1 - time.monotonic()))
    try:
        with connect(proxy.address) as sock:    # finds the outage: reset
            assert outcome(sock)[0] == 'rst'
    except ConnectionResetError:                # so soon that connect() saw it
        pass
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.address)
    wait_for(lambda: proxy.enabled, what='the listener to come back')
    assert round_trip(proxy.address) == b'ping'


def test_corrupt_flips_one_bit_in_a_share_of_the_bytes(make_proxy, backends):
    payload = bytes(100000)
    backend = backends(reply_backend, payload)
    proxy = make_proxy(backend.address)
    proxy.set_handler('corrupt', ratio=0.1)
    received = round_trip(proxy.address, b'go')
    assert len(received) == len(payload)
    flipped = [byte for byte in received if byte]
    assert all(bin(byte).count('1') == 1 for byte in flipped)
    assert 8000 < len(flipped) < 12000
    proxy.set_handler('corrupt', ratio=1)
    assert all(round_trip(proxy.address, b'go'))
    proxy.set_handler('corrupt', ratio=0)
    assert round_trip(proxy.address, b'go') == payload


def test_disable_refuses_connects_closes_live_ones_and_enable_reopens(proxy):
    client = Client(*proxy.control)
    live = connect(proxy.address)
    port = proxy.address[1]
    with client.down():
        assert client.status()['enabled'] is False
        assert outcome(live)[0] in ('eof', 'rst')
        with pytest.raises(ConnectionRefusedError):
            connect((LOOP, port))
    live.close()
    assert proxy.address[1] == port
    assert round_trip((LOOP, port)) == b'ping'


BAD_SETTINGS = [
    ('delay', {'sleep': -1}), ('delay', {'sleep': 'soon'}), ('delay', {'jitter': True}),
    ('delay', {'direction': 'sideways'}), ('errors', {'status': 99}),
    ('errors', {'status': 600}), ('errors', {'protocol': 'gopher'}), ('errors', {'size': -1}),
    ('abort', {'when': 'later'}), ('bandwidth', {'rate': 0}), ('bandwidth', {'rate': 1.5}),
    ('slicer', {'size': 0}), ('slicer', {'delay': float('inf')}),
    ('slow_close', {'delay': None}), ('timeout', {'timeout': []}),
    ('limit_data', {'bytes': -5}), ('transient', {'count': 'many'}),
    ('flap', {'up': 0}), ('flap', {'mode': 'maybe'}), ('corrupt', {'ratio': 1.5}),
    ('errors', {'code': 'HY000', 'protocol': 'mysql'}),
    ('errors', {'code': '12', 'protocol': 'postgresql'}),
    ('errors', {'code': '250', 'protocol': 'smtp'}),
    ('normal', {'anything': 1}), ('hang', {'x': 1}), ('blackout', {'x': 1}),
]


@pytest.mark.parametrize('name,settings', BAD_SETTINGS)
def test_bad_settings_are_refused_when_set(proxy, name, settings):
    with pytest.raises(vaurien.ConfigError, match=list(settings)[0]):
        proxy.set_handler(name, **settings)
    status, answer = api(proxy.control, 'PUT', '/handler',
                         json.dumps({'name': name, 'settings': settings}))
    assert status == 400 and list(settings)[0] in answer['error']
    assert proxy.get_handler()['handler'] == 'normal'


def test_list_handlers_and_the_api_tell_the_same_facts(proxy):
    listing = run_cli('--list-handlers').stdout
    details = api(proxy.control, 'GET', '/handlers')[1]['details']
    for name, detail in details.items():
        assert '%s: %s' % (name, detail['summary']) in listing
        assert detail['summary'].endswith('.')       # a whole sentence, if wrapped
        for key, setting in detail['settings'].items():
            assert '    %s (%s, default %s): %s' % (key, setting['type'], setting['default'],
                                                    setting['help']) in listing


def test_readme_documents_every_handler_and_setting():
    with open(os.path.join(HERE, 'README.txt')) as readme:
        text = readme.read()
    for name, handler in vaurien.default_handlers().items():
        assert name in text
        for key in handler.schema or {}:
            assert key in text


# ---------------------------------------------------------------------------
# Reliability: nothing lost, faults survived (issue: run them all in CI)
# ---------------------------------------------------------------------------

def proc_counts(pid):
    """(open descriptors, threads) of a process."""
    return (len(os.listdir('/proc/%d/fd' % pid)), len(os.listdir('/proc/%d/task' % pid)))


def proc_rss(pid):
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise AssertionError('no VmRSS')


def exchange(address, payload, deadline=120):
    """Send `payload` while reading the echo at the same time; the sha256 of the echo."""
    digest = hashlib.sha256()
    with connect(address) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        sock.settimeout(deadline)
        while True:
            data = sock.recv(262144)
            if not data:
                break
            digest.update(data)
        sender.join(deadline)
    return digest.hexdigest()


def test_soak_200_concurrent_connections_of_mixed_sizes_lose_nothing(make_proxy,
                                                                     echo_backend):
    proxy = make_proxy(echo_backend.address)
    rng = random.Random(2012)
    sizes = [int(2 ** rng.uniform(0, 22)) for _ in range(200)]   # 1 byte to 4 MiB
    payloads = [rng.getrandbits(8 * size).to_bytes(size, 'big') for size in sizes]
    results = [None] * len(payloads)

    def run(i):
        results[i] = exchange(proxy.address, payloads[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results == [hashlib.sha256(payload).hexdigest() for payload in payloads]


def test_soak_a_1gb_stream_arrives_intact(make_proxy):
    digest = {}

    def sink(sock):
        hasher, buffer = hashlib.sha256(), bytearray(1 << 20)
        view = memoryview(buffer)
        while True:
            size = sock.recv_into(buffer)
            if not size:
                break
            hasher.update(view[:size])
        digest['received'] = hasher.hexdigest()
        sock.sendall(b'done')
    backend = Backend(sink)
    try:
        proxy = make_proxy(backend.address)
        block = os.urandom(1 << 20)
        sent = hashlib.sha256()
        with connect(proxy.address) as sock:
            for i in range(1024):
                chunk = block[i:] + block[:i]
                sent.update(chunk)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock, 120) == b'done'
        assert digest['received'] == sent.hexdigest()
    finally:
        backend.close()


def stream_numbers_while_switching(proxy, cycle):
    """Stream 65,535 sequence numbers through `proxy` and back while the handler is
    switched through `cycle` ((name, settings) pairs) at least 300 times."""
    client = Client(*proxy.control)
    numbers = b''.join(struct.pack('!I', i) for i in range(65535))
    received = bytearray()
    stop = threading.Event()

    def toggle():
        switches = 0
        while (not stop.is_set() or switches < 300) and switches < 2000:
            name, settings = cycle[switches % len(cycle)]
            client.set_handler(name, **settings)
            switches += 1
        toggle.switches = switches
    with connect(proxy.address) as sock:
        toggler = threading.Thread(target=toggle)
        toggler.start()
        reader = threading.Thread(target=lambda: received.extend(read_all(sock, 120)))
        reader.start()
        for start in range(0, len(numbers), 400):
            sock.sendall(numbers[start:start + 400])
            if start % 40000 == 0:
                time.sleep(0.01)
        stop.set()
        toggler.join(120)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
    assert toggle.switches >= 300
    assert bytes(received) == numbers


def test_soak_switching_handlers_on_a_live_stream_keeps_every_number_in_order(proxy):
    stream_numbers_while_switching(proxy, [
        ('delay', {'sleep': 0.002, 'jitter': 0.001, 'direction': 'both'}), ('normal', {})])


# ---------------------------------------------------------------------------
# One pump for every connection: blocking handlers, descriptors, crowds
# ---------------------------------------------------------------------------

def gate_registry(gate):
    """Handlers: `gated` blocks (undecorated, as the announcement's delay) until
    `gate` is set, then relays; `sleepy` sleeps a little, then relays."""
    def gated(source, dest, to_backend, name, settings, proxy):
        gate.wait(WAIT)
        dest.sendall(proxy.get_data(source))

    def sleepy(source, dest, to_backend, name, settings, proxy):
        time.sleep(0.001)
        dest.sendall(proxy.get_data(source))
    handlers = vaurien.default_handlers()
    handlers['gated'] = vaurien.Handler('gated', gated)
    handlers['sleepy'] = vaurien.Handler('sleepy', sleepy)
    return handlers


def test_a_blocking_handler_holds_only_its_own_connections(make_proxy, echo_backend):
    gate = threading.Event()
    stuck = make_proxy(echo_backend.address, handlers=gate_registry(gate), behavior='100:gated')
    free = make_proxy(echo_backend.address)     # another Proxy: the same pump
    held = [connect(stuck.address) for _ in range(3)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(b'held %d' % i)
        results = [None] * 40

        def run(i):
            results[i] = round_trip(free.address, b'free %d' % i)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert results == [b'free %d' % i for i in range(40)]
        assert not gate.is_set()    # ...all answered while the handler was blocked
        gate.set()
        for i, sock in enumerate(held):
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b'held %d' % i
    finally:
        gate.set()
        for sock in held:
            sock.close()


def test_switching_between_blocking_and_loop_handlers_keeps_every_number_in_order(
        make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, handlers=gate_registry(threading.Event()),
                       http=True)
    stream_numbers_while_switching(proxy, [
        ('sleepy', {}), ('normal', {}), ('delay', {'sleep': 0.002, 'direction': 'both'}),
        ('sleepy', {}), ('delay', {'sleep': 0.001, 'direction': 'to_client'})])


@vaurien.traits(blocking=False)
def upper(source, dest, to_backend, name, settings, proxy):
    dest.sendall(proxy.get_data(source).upper())


def test_a_fault_laid_on_a_steady_connection_meets_its_next_chunk(make_proxy, echo_backend):
    """Once steady, a connection under `normal` without fault is read the quick way,
    its chunks sent straight to the other socket (`Side._read_quickly`): a fault
    laid then meets its next chunk all the same."""
    proxy = make_proxy(echo_backend.address, handlers={'upper': upper})
    with connect(proxy.address) as sock:
        for _ in range(3):
            sock.sendall(b'steady')
            assert read_exactly(sock, 6) == b'steady'
        proxy.add_fault('upper', direction='to_backend')
        sock.sendall(b'faulty')
        assert read_exactly(sock, 6) == b'FAULTY'


def test_chunks_read_the_quick_way_follow_those_a_delay_still_holds(make_proxy,
                                                                    echo_backend):
    """Switched from `delay` to `normal` while the backend's queue holds delayed bytes,
    a connection read the quick way sends nothing straight to the socket: its
    chunks wait behind the queue (b'123', not b'312')."""
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('delay', sleep=1)
    with connect(proxy.address) as sock:
        sock.sendall(b'1')
        wait_for(lambda: proxy._live() and proxy._live()[0].backend.queue,
                 what='1 delayed')
        conn, = proxy._live()
        proxy.set_handler('normal')
        sock.sendall(b'2')      # the general way (a switch since): queued behind 1
        wait_for(lambda: len(conn.backend.queue) == 2 and conn.settled is proxy.handling,
                 what='2 queued behind 1')
        sock.sendall(b'3')      # the quick way
        assert read_exactly(sock, 3) == b'123'


def test_chunks_for_a_side_shut_down_are_dropped_the_quick_way_too(make_proxy,
                                                                  echo_backend):
    """A handler shut the backend's write half; switched to `normal` since, the chunks
    the client still sends are dropped, as `sendall` drops them, not sent into a
    closed stream (which resets the connection)."""
    def shut(source, dest, to_backend, name, settings, proxy):
        dest.sendall(proxy.get_data(source))
        if to_backend:
            dest.shutdown()
    proxy = make_proxy(echo_backend.address, handlers={'shut': shut}, behavior='100:shut')
    with connect(proxy.address) as sock:
        sock.sendall(b'last')
        assert read_exactly(sock, 4) == b'last'
        conn, = proxy._live()
        wait_for(lambda: conn.backend.eof_read, what="the backend's EOF")
        proxy.set_handler('normal')
        sock.sendall(b'dropped')     # the general way (a switch since)
        wait_for(lambda: conn.settled is proxy.handling, what='the first chunk read')
        sock.sendall(b'dropped')     # the quick way
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: conn.released, what='the end')
    assert conn.ending[0] == 'eof' and conn.backend.delivered == 4


@pytest.mark.parametrize('shut_by', ['a thread', 'a handler in the same round'])
def test_a_kept_side_shut_down_elsewhere_stops_the_quick_way_sending_there(
        make_proxy, echo_backend, shut_by):
    """A handler kept the backend's side; switched to `normal` since, the connection
    is read the quick way, its chunks sent straight to the backend's socket.  The
    kept side shut down from another thread (a timer of the user's), or by another
    connection's handler in the round that reads the client's next chunk, that
    chunk is dropped, as `sendall` drops it: the client still gets the backend's
    answer, then an EOF, not a reset."""
    kept, stalled = {}, threading.Event()

    @vaurien.traits(blocking=False)
    def shutter(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data == b'shut':
            kept['backend'].shutdown()
        dest.sendall(data)

    @vaurien.traits(blocking=False)
    def stall(source, dest, to_backend, name, settings, proxy):
        stalled.set()
        time.sleep(1.0)    # holds the pump: what comes meanwhile is read in one round
        dest.sendall(proxy.get_data(source))

    @vaurien.traits(blocking=False)
    def keeper(source, dest, to_backend, name, settings, proxy):
        if to_backend:
            kept['backend'] = dest
        dest.sendall(proxy.get_data(source))
    received = []
    answer = threading.Event()

    def answer_at_eof(sock):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received.append(data)
        answer.wait(WAIT)
        sock.sendall(b'answer')
    backend = Backend(answer_at_eof)
    try:
        proxy = make_proxy(backend.address, handlers={'keeper': keeper},
                           behavior='100:keeper')
        with connect(proxy.address) as sock:
            sock.sendall(b'a')
            wait_for(lambda: received, what='a at the backend')
            conn, = proxy._live()
            proxy.set_handler('normal')
            sock.sendall(b'b')     # the general way (a switch since), then settled
            wait_for(lambda: conn.settled is proxy.handling and conn.backend.delivered == 2,
                     what='b relayed')
            if shut_by == 'a thread':
                threading.Thread(target=kept['backend'].shutdown).start()
                wait_for(lambda: conn.backend.eof_sent, what="the backend's EOF")
                sock.sendall(b'c')     # dropped
            else:
                shutting = make_proxy(echo_backend.address, handlers={'shutter': shutter},
                                      behavior='100:shutter')
                stalling = make_proxy(echo_backend.address, handlers={'stall': stall},
                                      behavior='100:stall')
                with connect(shutting.address) as other, connect(stalling.address) as holder:
                    other.sendall(b'open')
                    assert read_exactly(other, 4) == b'open'
                    holder.sendall(b'z')
                    assert stalled.wait(WAIT)
                    other.sendall(b'shut')     # read first in the pump's next round...
                    sock.sendall(b'c')         # ...then this: dropped
                    assert read_exactly(other, 4) == b'shut'
                    assert read_exactly(holder, 1) == b'z'
            proxy_end = conn.client.sock
            wait_for(lambda: proxy_end.fileno() < 0 or not select.select([proxy_end], [], [],
                                                                         0)[0],
                     what='c read by the proxy')
            answer.set()
            assert outcome(sock) == ('eof', b'answer')
    finally:
        answer.set()
        backend.close()


def test_a_get_request_hook_may_return_a_blocking_socket(make_proxy, echo_backend):
    """socketserver's own get_request (socket.accept(), from a non-blocking listener)
    gives a blocking socket: the connection makes it non-blocking, so that a client
    that does not read holds up no other connection of the pump."""
    class StockAccept(vaurien.Proxy):
        def get_request(self):
            return self.socket.accept()

    def flood(sock):
        with contextlib.suppress(OSError):
            sock.sendall(b'x' * (16 << 20))
    flooding = Backend(flood)
    stock = StockAccept('%s:0' % LOOP, '%s:%d' % flooding.address)
    try:
        other = make_proxy(echo_backend.address)
        with connect(stock.address) as lazy:
            lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            wait_for(lambda: stock._live() and stock._live()[0].client.queue,
                     what='the lazy client full')
            assert round_trip(other.address, b'others go on') == b'others go on'
    finally:
        stock.stop()
        flooding.close()


def test_a_proxy_disabled_by_a_handler_drops_the_events_the_pump_holds_for_it(
        make_proxy, echo_backend, caplog):
    """A handler disables another proxy while the pump holds an event of one of its
    steady connections, read the quick way (`Side._read_quickly`): the event
    goes with the connection, and nothing fails."""
    stalled = threading.Event()

    @vaurien.traits(blocking=False)
    def stall(source, dest, to_backend, name, settings, proxy):
        stalled.set()
        time.sleep(0.5)       # what comes meanwhile is read in the pump's next round
        dest.sendall(proxy.get_data(source))

    @vaurien.traits(blocking=False)
    def switch(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data == b'off':
            relayed.disable()
        dest.sendall(data)
    relayed = make_proxy(echo_backend.address)
    switching = make_proxy(echo_backend.address, handlers={'switch': switch},
                           behavior='100:switch')
    staller = make_proxy(echo_backend.address, handlers={'stall': stall},
                         behavior='100:stall')
    with caplog.at_level(logging.ERROR, logger='vaurien'), connect(relayed.address) as steady, \
            connect(switching.address) as switcher, connect(staller.address) as holder:
        for sock, data in ((steady, b'steady'), (steady, b'steady'), (switcher, b'warm')):
            sock.sendall(data)
            assert read_exactly(sock, len(data)) == data
        holder.sendall(b'z')
        assert stalled.wait(WAIT)
        switcher.sendall(b'off')   # read first, in the round after the stall...
        steady.sendall(b'late')    # ... then this, of a connection ended meanwhile
        assert read_exactly(switcher, 3) == b'off'
        assert outcome(steady)[0] != 'open'
        assert read_exactly(holder, 1) == b'z'
        assert round_trip(switching.address, b'still') == b'still'
    assert not caplog.records


def test_a_handler_registered_again_reaches_live_connections_that_drew_it(make_proxy,
                                                                          echo_backend):
    proxy = make_proxy(echo_backend.address)
    with connect(proxy.address) as sock:
        for _ in range(3):      # steady: read the quick way
            sock.sendall(b'steady')
            assert read_exactly(sock, 6) == b'steady'
        proxy.register('normal', upper)
        sock.sendall(b'after')
        assert read_exactly(sock, 5) == b'AFTER'


def test_a_connection_switched_back_to_normal_is_reported_under_normal(proxy):
    """Its delayed chunk going out after the switch, a connection is settled before it
    reads again: the chunks it reads next still name the handler in force."""
    def handlers():
        return [conn['handler'] for conn in api(proxy.control, 'GET',
                                                '/connections')[1]['connections']]
    proxy.set_handler('delay', sleep=0.5)
    with connect(proxy.address) as sock:
        sock.sendall(b'x')
        wait_for(lambda: handlers() == ['delay'], what='x read under delay')
        proxy.set_handler('normal')
        assert read_exactly(sock, 1) == b'x'
        for _ in range(3):
            sock.sendall(b'y')
            assert read_exactly(sock, 1) == b'y'
        assert handlers() == ['normal']


def test_a_bug_met_reading_the_quick_way_through_faults_ends_only_its_connection(
        make_proxy, echo_backend, monkeypatch, caplog):
    relay = vaurien.Layer.sendall

    def buggy(side, data, *args, **kwargs):
        if data == b'boom':
            raise RuntimeError('a bug of ours')
        return relay(side, data, *args, **kwargs)
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('normal')      # passes everything on, through its layers
    with caplog.at_level(logging.ERROR, logger='vaurien'), connect(proxy.address) as sock:
        for _ in range(3):      # steady: read the quick way
            sock.sendall(b'steady')
            assert read_exactly(sock, 6) == b'steady'
        monkeypatch.setattr(vaurien.Layer, 'sendall', buggy)
        sock.sendall(b'boom')
        assert outcome(sock)[0] != 'open'
        assert round_trip(proxy.address, b'others go on') == b'others go on'
        address = sock.getsockname()
    assert [record.message for record in caplog.records] == [
        'connection #0 from %s:%d failed' % address[:2]]


def test_a_bug_met_relaying_straight_to_the_peer_ends_only_its_connection(
        make_proxy, echo_backend, monkeypatch, caplog):
    """Without fault, the quick way sends a chunk to the peer's socket itself; what the
    socket does not take goes to its queue.  A bug met there ends that connection
    only.  The backend never reads: the chunks, one at a time (each read alone, and
    the quick way's), fill the sockets' buffers until one is sent in part."""
    def queue_bug(side, *args):
        raise RuntimeError('a bug of ours')
    listener = socket.create_server((LOOP, 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # accepted: inherited
    done = threading.Event()
    silent = Backend(lambda sock: done.wait(WAIT), listener=listener)
    try:
        proxy = make_proxy(silent.address)
        other = make_proxy(echo_backend.address)     # the same pump's
        message = b'x' * 60000      # under a chunk: read the quick way
        with caplog.at_level(logging.ERROR, logger='vaurien'), \
                connect(proxy.address) as sock:
            sock.sendall(b'first')
            wait_for(lambda: proxy._live() and proxy._live()[0].backend.delivered == 5,
                     what='the first bytes at the backend')
            conn, = proxy._live()
            monkeypatch.setattr(vaurien.Side, '_send_at', queue_bug)
            for sent in range(5 + len(message), 5 + 1000 * len(message), len(message)):
                sock.sendall(message)
                wait_for(lambda: conn.backend.delivered == sent or conn.released,
                         what='the message relayed, or the connection ended')
                if conn.released:
                    break
            assert outcome(sock)[0] != 'open'
            assert round_trip(other.address, b'others go on') == b'others go on'
            address = sock.getsockname()
        assert [record.message for record in caplog.records] == [
            'connection #0 from %s:%d failed' % address[:2]]
    finally:
        done.set()
        silent.close()


def test_chunks_read_after_a_switch_to_normal_follow_those_the_worker_holds(make_proxy,
                                                                           echo_backend):
    """Switched from a blocking handler to normal while its worker holds a chunk, a
    connection sends what it reads next after that chunk, however many chunks
    come meanwhile (none is read the quick way while the worker has calls)."""
    gate = threading.Event()
    proxy = make_proxy(echo_backend.address, handlers=gate_registry(gate),
                       behavior='100:gated')
    with connect(proxy.address) as sock:
        try:
            sock.sendall(b'1')
            wait_for(lambda: proxy._live() and proxy._live()[0].jobs, what='1 in the worker')
            conn, = proxy._live()
            proxy.set_handler('normal')
            for number, data in enumerate((b'2', b'3'), 2):
                sock.sendall(data)
                wait_for(lambda: conn.jobs >= number or conn.client.delivered,
                         what='%s behind 1' % data)
        finally:
            gate.set()
        assert read_exactly(sock, 3) == b'123'


def test_a_closing_connection_drains_a_client_that_keeps_talking(make_proxy, echo_backend):
    """Closed by a fault, a connection reads on while the client keeps sending (at most
    MAX_DRAIN seconds), and ends LINGER seconds after it stops: a client still
    sending after the EOF is not reset, which could cost it the answer."""
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('limit_data', bytes=5)
    with connect(proxy.address) as sock:
        sock.sendall(b'hello')
        assert read_exactly(sock, 5) == b'hello'
        end = time.monotonic() + 2.5 * vaurien.LINGER
        while time.monotonic() < end:
            sock.sendall(b'more')      # never reset: drained
            time.sleep(vaurien.LINGER / 20)
        sock.shutdown(socket.SHUT_WR)
        assert outcome(sock) == ('eof', b'')


@pytest.mark.parametrize('called_as', ['handler', 'fault', 'on_connect'])
def test_a_handler_that_holds_the_pump_up_is_logged_once(make_proxy, echo_backend, caplog,
                                                         called_as):
    def hook(client, backend, name, settings, proxy):
        if called_as == 'on_connect':
            time.sleep(0.06)

    @vaurien.traits(blocking=False, on_connect=hook)
    def hasty(source, dest, to_backend, name, settings, proxy):
        if called_as != 'on_connect':
            time.sleep(0.06)      # wrongly promised not to block
        dest.sendall(proxy.get_data(source))
    @vaurien.traits(blocking=False)
    def passing(source, dest, to_backend, name, settings, proxy):   # its send calls hasty
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, handlers={'hasty': hasty, 'passing': passing})
    if called_as == 'fault':
        proxy.add_fault('passing', name='before_it')
        proxy.add_fault('hasty', name='slow_fault')
    else:
        proxy.set_handler('hasty')
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        for _ in range(2):
            assert round_trip(proxy.address) == b'ping'
    warnings = [r.message for r in caplog.records if 'took' in r.message]
    assert len(warnings) == 1 and 'delay=' in warnings[0]
    assert ('handler slow_fault took' if called_as == 'fault' else 'handler hasty took') \
        in warnings[0]


def test_a_backend_name_is_resolved_off_the_pump_and_each_address_tried(make_proxy,
                                                                        echo_backend):
    """localhost may resolve to ::1 first, where nothing listens: 127.0.0.1 is tried next."""
    proxy = make_proxy(('localhost', echo_backend.address[1]))
    for _ in range(3):
        assert round_trip(proxy.address) == b'ping'


def cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def fill_up(address, count, patience):
    """Open `count` connections that each send a byte; return them, and what each got
    back within `patience` seconds: b'x' (served), b'' (EOF), None (reset) or 'open'."""
    held, refused = [], 0
    for _ in range(count):
        sock = connect_or_none(address)
        if sock is None:
            refused += 1        # reset while connecting: ended at once, too
        else:
            held.append(sock)
    ends = {}
    with selectors.DefaultSelector() as selector:
        for sock in held:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + patience
        while len(ends) < len(held) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                try:
                    ends[key.fileobj] = key.fileobj.recv(1)
                except ConnectionResetError:
                    ends[key.fileobj] = None
                selector.unregister(key.fileobj)
    return held, [ends.get(sock, 'open') for sock in held] + [None] * refused


def connect_or_none(address):
    """A connection that sent a byte; None if it was reset first (at connect, or send)."""
    try:
        sock = connect(address)
    except ConnectionResetError:
        return None
    try:
        sock.sendall(b'x')
    except ConnectionResetError:
        sock.close()
        return None
    return sock


def test_at_the_descriptor_limit_excess_connections_end_at_once_and_service_resumes(
        cli_proxy, echo_backend):
    """64 descriptors: a backend that cannot be connected, then a client that cannot be
    accepted (under `hang`, a connection takes one descriptor)."""
    proc = cli_proxy('--distant', '%s:%d' % echo_backend.address, files=(64, 64))
    client = Client(*proc.control)
    for episode, (handler, served) in enumerate((('normal', b'x'), ('hang', 'open')), 1):
        client.set_handler(handler)
        held, ends = fill_up(proc.address, 80, patience=WAIT if handler == 'normal' else 2)
        try:
            assert ends.count(served) >= 10, ends
            assert ends.count(None) + ends.count(b'') >= 10 and len(set(ends)) <= 3, ends
            # a control API call waiting to be accepted must not make it spin either
            held.append(socket.create_connection(proc.control, timeout=WAIT))
            before = cpu_seconds(proc.process.pid)
            time.sleep(1)
            assert cpu_seconds(proc.process.pid) - before < 0.3    # no spinning meanwhile
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: client.status()['connections'] == 0, what='the connections to end')
        client.set_handler('normal')
        assert round_trip(proc.address) == b'ping'    # served again, on its own
        wait_for(lambda: ''.join(proc.rest).count('available again')
                 == ''.join(proc.lines + proc.rest).count('out of file descriptors') >= episode,
                 what='the line that ends the episode')
    log = ''.join(proc.lines + proc.rest)
    assert log.count('out of file descriptors') <= 4, log    # a line per episode, not per client


def test_the_command_line_raises_the_soft_descriptor_limit(cli_proxy, echo_backend):
    proc = cli_proxy('--distant', '%s:%d' % echo_backend.address, files=(64, 1024))
    held = [connect(proc.address) for _ in range(100)]   # 200 descriptors in the proxy
    try:
        for i, sock in enumerate(held):
            sock.sendall(b'%d' % i)
        for i, sock in enumerate(held):
            assert read_exactly(sock, len(b'%d' % i)) == b'%d' % i
    finally:
        for sock in held:
            sock.close()


class SelectorEcho:
    """An echo backend of one thread and one selector, for thousands of connections."""

    def __init__(self):
        self.listener = socket.create_server((LOOP, 0), backlog=4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            for key, _ in self.selector.select(0.05):
                if key.fileobj is self.listener:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            sock, _ = self.listener.accept()
                            sock.setblocking(False)
                            self.selector.register(sock, selectors.EVENT_READ)
                    continue
                with contextlib.suppress(BlockingIOError):
                    data = key.fileobj.recv(65536)
                    if data:
                        key.fileobj.send(data)   # tiny messages: the buffer takes them
                    else:
                        self.selector.unregister(key.fileobj)
                        key.fileobj.close()

    def close(self):
        self.stopping = True
        self.thread.join(WAIT)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def kernel_setting(name, default):
    """An integer under /proc/sys (Linux), or `default` where there is none."""
    try:
        with open('/proc/sys/' + name) as stream:
            return int(stream.read())
    except (OSError, ValueError):
        return default


def test_5000_held_connections_all_echo(cli_proxy):
    count = 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * count + 200:
        pytest.skip('the open files limit (%d) is below %d' % (hard, 2 * count + 200))
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backend = SelectorEcho()
    socks = []
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address, '--log-level', 'warning')
        slowest = 0.0
        for _ in range(count):     # as fast as they go: faster than the proxy accepts
            started = time.monotonic()
            socks.append(connect(proc.address))
            slowest = max(slowest, time.monotonic() - started)
        if kernel_setting('net/core/somaxconn', 0) >= 4096:
            assert slowest < 0.9    # the listen queue dropped no SYN (sent again after 1 s)
        for i, sock in enumerate(socks):
            sock.sendall(b'%d;' % i)
        for i, sock in enumerate(socks):
            assert read_exactly(sock, len(b'%d;' % i)) == b'%d;' % i
        assert Client(*proc.control).status()['connections'] == count
    finally:
        for sock in socks:
            sock.close()
        backend.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_close_with_data_in_flight_both_ways(make_proxy):
    """Each side half-closes while megabytes are still on their way to it."""
    big = os.urandom(5_000_000)

    def stream_then_read(sock):
        sock.sendall(big)
        sock.shutdown(socket.SHUT_WR)   # the backend is done talking first
        backend.got = hashlib.sha256(read_all(sock, 60)).digest()
    backend = Backend(stream_then_read)
    try:
        proxy = make_proxy(backend.address)
        with connect(proxy.address) as sock:
            upload = os.urandom(3_000_000)
            sock.sendall(upload[:1000])
            assert read_exactly(sock, len(big), 60) == big
            assert read_all(sock) == b''                 # the backend's EOF, relayed
            sock.sendall(upload[1000:])                  # the other way still flows
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: getattr(backend, 'got', None) == hashlib.sha256(upload).digest(),
                     what='the upload after the half-close')
    finally:
        backend.close()


def test_backend_killed_and_restarted_the_proxy_carries_on(make_proxy):
    spare = socket.create_server((LOOP, 0))
    address = spare.getsockname()
    spare.close()
    backend = Backend(echo, address)
    proxy = make_proxy(address)
    live = [connect(proxy.address) for _ in range(5)]
    for sock in live:
        sock.sendall(b'x')
        assert read_exactly(sock, 1) == b'x'
    backend.close()                                        # the database goes down
    started = time.monotonic()
    for sock in live:
        assert outcome(sock, deadline=5)[0] in ('eof', 'rst')
        sock.close()
    assert time.monotonic() - started < 3
    with connect(proxy.address) as sock:                   # while it is down
        assert outcome(sock, deadline=5)[0] in ('eof', 'rst')
    backend = Backend(echo, address)                       # and comes back
    try:
        assert round_trip(proxy.address) == b'ping'
    finally:
        backend.close()


def test_backend_killed_and_restarted_with_a_real_redis(make_proxy, tmp_path):
    server = shutil.which('redis-server')
    redis = pytest.importorskip('redis')
    if not server:
        pytest.skip('redis-server is not installed (apt-get install redis-server)')
    spare = socket.create_server((LOOP, 0))
    port = spare.getsockname()[1]
    spare.close()

    def run_redis():
        process = subprocess.Popen([server, '--port', str(port), '--bind', LOOP, '--save', '',
                                    '--appendonly', 'no', '--dir', str(tmp_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _accepts((LOOP, port)), what='redis-server')
        return process
    process = run_redis()
    try:
        proxy = make_proxy((LOOP, port))
        db = redis.Redis(host=LOOP, port=proxy.address[1], socket_timeout=5)
        assert db.set('k', 'v') and db.get('k') == b'v'
        process.terminate()
        process.wait(WAIT)
        with pytest.raises(redis.exceptions.ConnectionError):
            db.get('k')
        process = run_redis()
        assert db.set('k', 'again') and db.get('k') == b'again'  # the pool reconnects
    finally:
        process.kill()
        process.wait(WAIT)


def _accepts(address):
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


def rst_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    sock.close()


SOAK_CONNECTIONS = int(os.environ.get('VAURIEN_SOAK', '10000'))


def vanishing_backend(sock):
    """What the backend does depends on the first byte the client sends."""
    kind = sock.recv(1)
    if kind == b'R':                 # resets mid-stream
        sock.sendall(b'x' * 1000)
        rst_close(sock)
    elif kind == b'C':               # closes mid-stream
        sock.sendall(b'x' * 1000)
    elif kind in (b'c', b'r', b'n'):  # streams to a client that vanishes or never reads
        with contextlib.suppress(OSError):
            for _ in range(16):
                sock.sendall(b'y' * 16384)


def vanish_once(address, kind):
    sock = connect(address)
    sock.sendall(kind)
    if kind in (b'R', b'C'):
        outcome(sock, deadline=5)
        sock.close()
    elif kind == b'r':
        sock.recv(100)
        rst_close(sock)
    elif kind == b'c':
        sock.recv(100)
        sock.close()
    else:                            # never reads; leaves after a moment
        time.sleep(0.001)
        sock.close()


def test_soak_vanishing_peers_leak_no_descriptor_or_thread(cli_proxy):
    """10,000 connections of every kind of vanishing peer; counts come back."""
    backend = Backend(vanishing_backend)
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address, '--log-level', 'error')
        pid = proc.process.pid
        for kind in b'RCcrn':
            vanish_once(proc.address, bytes([kind]))
        wait_for(lambda: Client(*proc.control).status()['connections'] == 0,
                 what='the warm-up connections to end')
        before = proc_counts(pid)
        kinds = [bytes([k]) for k in b'RCcrn']

        def worker(offset):
            for i in range(offset, SOAK_CONNECTIONS * len(kinds), 16):
                vanish_once(proc.address, kinds[i % len(kinds)])
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(600)
        client = Client(*proc.control)
        wait_for(lambda: client.status()['connections'] == 0, deadline=30,
                 what='every connection to end')
        wait_for(lambda: proc_counts(pid) <= before, deadline=30,
                 what='descriptors and threads back to %s (now %s)' % (before, proc_counts(pid)))
        assert client.status()['accepted'] >= SOAK_CONNECTIONS * len(kinds)
        assert round_trip_through(proc.address) == b'ok'
    finally:
        backend.close()


def round_trip_through(address):
    with connect(address) as sock:
        sock.sendall(b'C')
        return b'ok' if outcome(sock)[1] == b'x' * 1000 else b'bad'


@pytest.mark.parametrize('vanish', ['client_rst', 'client_close', 'backend_rst',
                                    'backend_close'])
def test_the_other_side_is_closed_within_a_second(make_proxy, vanish):
    held = {}

    def serve(sock):
        held['sock'] = sock
        sock.sendall(b'hello')
        if vanish == 'backend_rst':
            time.sleep(0.1)
            rst_close(sock)
        elif vanish == 'backend_close':
            time.sleep(0.1)
            sock.close()
        else:
            held['seen'] = outcome(sock, deadline=5)[0]
            held['at'] = time.monotonic()
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        sock = connect(proxy.address)
        assert read_exactly(sock, 5) == b'hello'
        if vanish.startswith('client'):
            gone = time.monotonic()
            rst_close(sock) if vanish == 'client_rst' else sock.close()
            wait_for(lambda: 'at' in held, what='the backend to see the end')
            assert held['seen'] in ('eof', 'rst') and held['at'] - gone < 1.0
        else:
            started = time.monotonic()
            assert outcome(sock, deadline=5)[0] in ('eof', 'rst')
            assert time.monotonic() - started < 1.0 + 0.1
            sock.close()
    finally:
        backend.close()


def firehose_backend():
    """A backend that sends as fast as it can, up to 500 MB: its `.sent` says how far."""
    def firehose(sock):
        chunk = b'z' * 65536
        with contextlib.suppress(OSError):
            while backend.sent < 500_000_000:
                sock.sendall(chunk)
                backend.sent += len(chunk)
    backend = Backend(firehose)
    backend.sent = 0
    return backend


def test_a_client_that_stops_reading_does_not_grow_the_proxy(cli_proxy):
    backend = firehose_backend()
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address)
        pid = proc.process.pid
        with connect(proc.address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b'go')
            wait_for(lambda: backend.sent > 1_000_000, what='the backend to start')
            time.sleep(0.5)
            first, rss = backend.sent, proc_rss(pid)
            time.sleep(1.0)
            assert backend.sent - first < 1_000_000     # the backend is held back
            assert proc_rss(pid) - rss < 4_000_000      # and memory stays flat
            assert backend.sent < 40_000_000
    finally:
        backend.close()


@pytest.mark.parametrize('faults', [['delay'], ['delay', 'slow']])
def test_data_a_fault_holds_stops_the_reading_too(make_proxy, faults):
    """Over 1 MiB staged in fault layers stops the reading, as a queue does: a
    delay does not let a fast backend fill the proxy's memory meanwhile."""
    def slow(source, dest, to_backend, name, settings, proxy):   # blocking: a worker's
        time.sleep(0.01)
        dest.sendall(proxy.get_data(source))
    backend = firehose_backend()
    try:
        proxy = make_proxy(backend.address, handlers={'slow': slow})
        for name in faults:
            proxy.add_fault(name, direction='to_client', **({'sleep': 0.5} if name == 'delay'
                                                            else {}))
        with connect(proxy.address) as sock:
            sock.sendall(b'go')
            wait_for(lambda: backend.sent > 1_000_000, what='the backend to start')
            time.sleep(1.5)
            assert backend.sent < 40_000_000     # held back: 1 MiB and the buffers
            assert read_exactly(sock, 5_000_000) == b'z' * 5_000_000
    finally:
        backend.close()


@pytest.mark.parametrize('blocking', [True, False])
def test_a_buffer_a_handler_reuses_at_once_is_sent_as_it_was(make_proxy, echo_backend,
                                                             blocking):
    """sendall() and answer_and_close() take what the buffer holds when called, from
    the pump or from a blocking handler's worker."""
    @vaurien.traits(blocking=blocking)
    def answer(source, dest, to_backend, name, settings, proxy):
        proxy.get_data(source)
        buffer = bytearray(b'first;')
        source.sendall(buffer)
        buffer[:] = b'XXXXXX'
        more = array.array('B', b'more;')     # any buffer, queued for later
        source.sendall(more, delay=0.05)
        more[0] = ord('X')
        buffer[:] = b'second'
        source.answer_and_close(buffer)
        buffer[:] = b'XXXXXX'
    proxy = make_proxy(echo_backend.address, handlers={'answer': answer})
    proxy.set_handler('answer')
    with connect(proxy.address) as sock:
        sock.sendall(b'go')
        assert outcome(sock) == ('eof', b'first;more;second')


def test_a_buffer_a_fault_passes_to_a_blocking_fault_is_passed_as_it_was(make_proxy,
                                                                         echo_backend):
    @vaurien.traits(blocking=False)
    def reusing(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        buffer = bytearray(data)
        dest.sendall(buffer)            # on to the blocking fault's worker, at once
        buffer[:] = b'X' * len(buffer)

    def slow(source, dest, to_backend, name, settings, proxy):
        time.sleep(0.05)
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, handlers={'reusing': reusing, 'slow': slow})
    proxy.add_fault('reusing', direction='to_backend')
    proxy.add_fault('slow', direction='to_backend')
    assert round_trip(proxy.address, b'hello') == b'hello'


@pytest.mark.parametrize('blocking', [True, False])
def test_a_str_sent_by_mistake_is_the_handlers_failure(make_proxy, echo_backend, caplog,
                                                       blocking):
    @vaurien.traits(blocking=blocking)
    def wrong(source, dest, to_backend, name, settings, proxy):
        proxy.get_data(source)
        source.sendall('text', delay=0.05)
    proxy = make_proxy(echo_backend.address, handlers={'wrong': wrong})
    proxy.set_handler('wrong')
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        with connect(proxy.address) as sock:
            sock.sendall(b'go')
            assert outcome(sock)[0] == 'rst'
    assert 'handler wrong failed' in caplog.text and 'pump failed' not in caplog.text


def test_the_threads_of_blocking_handlers_end_and_leave_no_trace(make_proxy, echo_backend):
    """threading counts them while they run, and no more once they are done, even those
    whose handler asked for its thread (logging does)."""
    def chatty(source, dest, to_backend, name, settings, proxy):
        logging.getLogger('test.chatty').info('in %s', threading.current_thread().name)
        dest.sendall(proxy.get_data(source))
    def traces():     # (the other tests' threads come and go meanwhile)
        return {thread for thread in threading.enumerate()
                if thread.name.startswith(('vaurien-worker', 'Dummy-'))}
    proxy = make_proxy(echo_backend.address, handlers={'chatty': chatty})
    proxy.set_handler('chatty')
    before = traces()
    for _ in range(20):
        assert round_trip(proxy.address) == b'ping'
    wait_for(lambda: traces() <= before, what='the workers to end')


def test_a_buffer_reused_after_a_send_the_socket_took_in_part_is_sent_as_it_was(
        make_proxy, echo_backend):
    """A send the client's socket takes only in part queues the rest: the handler's
    buffer is copied then, not kept (the pump's own sendall, no worker)."""
    size = 32_000_000

    @vaurien.traits(blocking=False)
    def big(source, dest, to_backend, name, settings, proxy):
        proxy.get_data(source)
        buffer = bytearray(b'a' * size)
        source.sendall(buffer)
        buffer[:] = b'b' * size
        return False
    proxy = make_proxy(echo_backend.address, handlers={'big': big})
    proxy.set_handler('big')
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)   # so a part waits
        sock.settimeout(WAIT)
        sock.connect(proxy.address)
        sock.sendall(b'go')
        received = read_all(sock)
    assert len(received) == size and received.count(b'a') == size


def test_a_faults_close_hook_is_logged_under_the_faults_name(make_proxy, echo_backend,
                                                              caplog):
    def closing(connection, name, proxy):
        raise RuntimeError('hook bug')

    @vaurien.traits(blocking=False, on_close=closing)
    def watched(source, dest, to_backend, name, settings, proxy):
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, handlers={'watched': watched})
    proxy.add_fault('watched', name='watcher')
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        assert round_trip(proxy.address) == b'ping'
        wait_for(lambda: 'hook bug' in caplog.text, what='the hook to run')
    assert 'handler watcher failed' in caplog.text


def test_a_close_hook_is_called_once_for_a_handler_in_force_and_as_a_fault(make_proxy,
                                                                           echo_backend):
    closes = []

    def closing(connection, name, proxy):
        closes.append(name)

    @vaurien.traits(blocking=False, on_close=closing)
    def counted(source, dest, to_backend, name, settings, proxy):
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, handlers={'counted': counted})
    proxy.set_handler('counted')
    proxy.add_fault('counted')
    assert round_trip(proxy.address) == b'ping'
    wait_for(lambda: closes, what='the hook')
    proxy.pump.call(lambda: None)      # the pump is past the connection's end
    assert closes == ['counted']


def test_a_bool_takes_true_false_1_0_and_words_only():
    convert = vaurien.OPTIONS['http'].convert
    assert [convert(value) for value in (True, 1, 'on', False, 0, 'off')] == [True] * 3 + [
        False] * 3
    for value in (1.0, decimal.Decimal(1), 2, 'maybe', None, []):
        with pytest.raises(ValueError):
            convert(value)


def test_a_summary_is_the_first_paragraph_without_the_settings_under_it():
    def mine(source, dest, to_backend, name, settings, proxy):
        """Upper-cases
        the traffic.
        Settings:
          loud (bool, default true): whether it does.
        """
    assert vaurien.Handler('mine', mine).summary == 'Upper-cases the traffic.'


def test_a_blocking_handler_holds_its_connection_only(make_proxy, echo_backend):
    def sleeper(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data.startswith(b'slow'):
            time.sleep(2)
        dest.sendall(data)
    proxy = make_proxy(echo_backend.address, handlers=custom_registry(sleeper=sleeper),
                       behavior='100:sleeper', http=True)
    with connect(proxy.address) as stuck:
        stuck.sendall(b'slow')
        time.sleep(0.1)
        started = time.monotonic()
        for _ in range(5):
            assert round_trip(proxy.address, b'fast') == b'fast'
        assert Client(*proxy.control).get_handler()['handler'] == 'sleeper'
        assert time.monotonic() - started < 1.5
        assert read_exactly(stuck, 4) == b'slow'


def test_the_api_stays_responsive_under_hangs_stalls_cuts_and_many_callers(make_proxy,
                                                                          echo_backend):
    proxy = make_proxy(echo_backend.address, http=True, behavior='50:hang,25:timeout')
    hung = [connect(proxy.address) for _ in range(100)]
    for sock in hung:
        sock.sendall(b'x' * 1000)
    stalled = [connect(proxy.control) for _ in range(20)]
    for sock in stalled:
        sock.sendall(b'PUT /handler HTTP/1.1\r\nContent-Length: 100\r\n\r\n{')
    latencies, failures = [], []

    def caller(i):
        client = Client(*proxy.control)
        for j in range(30):
            started = time.monotonic()
            try:
                if j % 3 == 0:
                    client.get_handler()
                elif j % 3 == 1:
                    client.status()
                else:
                    client.set_behavior('50:hang,25:timeout,%d:blackout' % (i % 5 + 1))
            except vaurien.VaurienError as exc:
                failures.append(exc)
            latencies.append(time.monotonic() - started)
    callers = [threading.Thread(target=caller, args=(i,)) for i in range(30)]
    for thread in callers:
        thread.start()
    for sock in hung[:50]:
        rst_close(sock)   # cuts while the API is busy
    for thread in callers:
        thread.join(60)
    assert failures == [] and len(latencies) == 900
    assert max(latencies) < 2.0
    for sock in hung[50:] + stalled:
        sock.close()


def test_max_connections_refuses_beyond_with_a_log_line(make_proxy, echo_backend, caplog):
    proxy = make_proxy(echo_backend.address, max_connections=3)
    held = [connect(proxy.address) for _ in range(3)]
    for sock in held:
        sock.sendall(b'a')
        assert read_exactly(sock, 1) == b'a'
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        try:
            with connect(proxy.address) as extra:
                assert outcome(extra)[0] in ('rst', 'eof')
        except ConnectionResetError:   # the reset can beat connect()'s return
            pass
    assert '--max-connections' in caplog.text
    for sock in held:
        sock.sendall(b'b')
        assert read_exactly(sock, 1) == b'b'
        sock.close()
    wait_for(lambda: proxy.connection_count == 0, what='connections to end')
    assert round_trip(proxy.address) == b'ping'


def test_connect_timeout_closes_the_client_when_the_backend_never_answers(make_proxy,
                                                                         echo_backend):
    with full_backlog() as silent:
        proxy = make_proxy(silent.getsockname(), connect_timeout=2.0)
        other = make_proxy(echo_backend.address)
        started = time.monotonic()     # before the proxy accepts and arms the timeout
        with connect(proxy.address) as sock:
            sock.sendall(b'waiting for a backend')
            # the connect is a timer in the pump: other connections go on meanwhile
            assert round_trip(other.address) == b'ping'
            assert time.monotonic() - started < 1.5
            assert outcome(sock)[0] in ('eof', 'rst')
            assert 1.99 <= time.monotonic() - started < 6


@contextlib.contextmanager
def full_backlog():
    """A listener that never accepts, its backlog full: later SYNs get no answer."""
    listener = socket.socket()
    listener.bind((LOOP, 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        yield listener
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_connect_in_progress_relays_what_waited_once_it_is_done(make_proxy):
    """A backend whose backlog is full drops the SYN: the connect stays in progress
    (loopback connects are otherwise done at once), the client's bytes wait; when the
    backend accepts again, the SYN sent again connects, and they go."""
    backend = None
    with full_backlog() as listener:
        proxy = make_proxy(listener.getsockname(), connect_timeout=WAIT)
        try:
            with connect(proxy.address) as sock:
                sock.sendall(b'sent while the backend is connecting')
                wait_for(lambda: proxy.connection_count == 1, what='the connection')
                conn, = proxy._live()
                assert conn.backend.connecting and conn.connect_timer is not None
                backend = Backend(echo, listener=listener)
                assert read_exactly(sock, 36) == b'sent while the backend is connecting'
                assert not conn.backend.connecting and conn.connect_timer is None
        finally:
            if backend is not None:
                backend.close()


def test_control_api_warns_when_it_listens_beyond_loopback(echo_backend, caplog):
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        proxy = Proxy(LOOP + ':0', '%s:%d' % echo_backend.address, http=True,
                      http_host='0.0.0.0', http_port=0).start()
        proxy.stop()
    assert 'beyond loopback' in caplog.text and '--http-token' in caplog.text
    assert vaurien.OPTIONS['http_host'].default == 'localhost'


# ---------------------------------------------------------------------------
# Bad input, tried broadly: always a clear error, never a crash
# ---------------------------------------------------------------------------

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa

BROAD = hsettings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=5)
HANDLERS = vaurien.default_handlers()
SETTINGS = sorted((name, key) for name, handler in HANDLERS.items()
                  for key in handler.schema or {})


@BROAD
@given(spec=st.text(max_size=40) | st.lists(
    st.tuples(st.floats(-10, 150) | st.text(max_size=4),
              st.sampled_from(sorted(HANDLERS) + ['', 'nope', ' delay'])),
    max_size=4).map(lambda entries: ','.join('%s:%s' % entry for entry in entries)))
def test_any_behavior_string_parses_or_is_a_one_line_config_error(spec):
    try:
        mix = vaurien.Behavior(spec, HANDLERS)
    except vaurien.ConfigError as exc:
        assert '\n' not in str(exc) and str(exc)
    else:
        assert abs(sum(percent for percent, _ in mix.entries) - 100) < 1e-6
        assert str(vaurien.Behavior(str(mix), HANDLERS)) == str(mix)


@BROAD
@given(target=st.sampled_from(SETTINGS), value=JSON_VALUES)
def test_any_setting_value_is_typed_or_refused(target, value):
    name, key = target
    handler = HANDLERS[name]
    try:
        settings = handler.validate({key: value})
    except vaurien.ConfigError as exc:
        assert key in str(exc) and '\n' not in str(exc)
    else:
        kind = handler.schema[key].type
        expected = {'int': int, 'float': float, 'seconds': float, 'bytes': int, 'rate': int,
                    'bool': bool}.get(kind, str)
        assert type(settings[key]) is expected


@BROAD
@given(method=st.sampled_from(['GET', 'PUT', 'POST', 'DELETE', 'PATCH']),
       path=st.sampled_from(['/handler', '/handlers', '/behavior', '/proxy', '/', '/x',
                             '/handler/', '/handler?x=1']),
       body=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()) |
       st.fixed_dictionaries({'name': st.sampled_from(sorted(HANDLERS) + ['x']),
                              'settings': st.dictionaries(st.sampled_from(
                                  [k for _, k in SETTINGS]), JSON_VALUES, max_size=3)}
                             ).map(lambda v: json.dumps(v).encode()))
def test_any_api_request_gets_a_json_answer_and_the_proxy_keeps_relaying(api_proxy, method,
                                                                        path, body):
    if method in ('PUT', 'POST', 'PATCH') and path == '/proxy':
        body = b'{"enabled": true}'   # disabling is legal; its effect is tested elsewhere
    status, answer = api(api_proxy.control, method, path, body)
    assert status in (200, 400, 404, 405, 409, 411, 413)   # 409: DELETE /proxy, the default
    assert (status == 200) == ('error' not in answer)
    if status != 200:
        assert answer['status'] == status and '\n' not in answer['error']


@pytest.fixture(scope='module')
def api_proxy():
    backend = Backend(echo)
    proxy = Proxy(LOOP + ':0', '%s:%d' % backend.address, http=True, http_port=0).start()
    yield proxy
    proxy.set_handler('normal')
    assert round_trip(proxy.address) == b'ping'
    proxy.stop()
    backend.close()


@BROAD
@given(text=st.text(max_size=200) | st.lists(
    st.sampled_from(['[vaurien]', '[handler:delay]', '[handler:x]', '[handler:]', '[other]',
                     'distant = a:1', 'behavior = 20:delay', 'behavior = 200:x', 'sleep = 2',
                     'sleep = -1', 'http_port = 99999', 'seed = x', 'callable = os.getcwd',
                     'callable = nope.nope', 'jitter', '= 3', '  indented = 1', '%(x)s = 1',
                     'local = ::1', 'log_level = info']),
    max_size=8).map('\n'.join))
def test_any_config_file_is_read_or_refused_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp('ini') / 'v.ini'
    path.write_text(text)
    try:
        vaurien.resolve(vaurien.build_parser().parse_args(
            ['--config', str(path), '--list-handlers']))
    except vaurien.ConfigError as exc:
        assert str(exc).startswith(str(path)) and '\n' not in str(exc)


@BROAD
@given(option=st.sampled_from(sorted(vaurien.OPTIONS)), value=st.text(max_size=30))
def test_any_option_value_is_taken_or_refused_in_one_line(option, value):
    flag = '--' + option.replace('_', '-')
    args = ['--distant', 'a:1', '--list-handlers']
    if vaurien.OPTIONS[option].type != 'bool':
        args += [flag + '=' + value]
    try:
        vaurien.resolve(vaurien.build_parser().parse_args(args))
    except vaurien.ConfigError as exc:
        assert flag in str(exc) and '\n' not in str(exc)


def test_a_garbled_settings_block_is_refused_not_ignored():
    def garbled(source, dest, to_backend, name, settings, proxy):
        """Does things.

        Settings:
          sleep = 1, a float
        """
    def mistyped(source, dest, to_backend, name, settings, proxy):
        """Does things.

        Settings:
          sleep (flaot, default 1): seconds.
        """
    def dedented(source, dest, to_backend, name, settings, proxy):
        """Does things.

    Settings:
          sleep (float >= 0, default 1): seconds.
        """
    with pytest.raises(vaurien.ConfigError, match='garbled.*starts with'):
        vaurien.Handler('garbled', garbled)
    with pytest.raises(vaurien.ConfigError, match="unknown type 'flaot'"):
        vaurien.Handler('mistyped', mistyped)
    assert vaurien.Handler('dedented', dedented).settings == {'sleep': 1.0}


def test_on_close_is_called_once_however_the_connection_ends(make_proxy, echo_backend):
    closed = []

    @vaurien.traits(on_close=lambda conn, name, proxy: closed.append((conn.index, name)))
    def counted(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data == b'cut':
            return False
        dest.sendall(data)
    proxy = make_proxy(echo_backend.address, handlers=custom_registry(counted=counted),
                       behavior='100:counted')
    assert round_trip(proxy.address) == b'ping'                # ends by EOF
    with connect(proxy.address) as sock:                       # ends by the handler
        sock.sendall(b'cut')
        outcome(sock)
    sock = connect(proxy.address)                              # ends by a reset
    sock.sendall(b'x')
    read_exactly(sock, 1)
    rst_close(sock)
    live = connect(proxy.address)                              # ends by disable
    live.sendall(b'y')
    read_exactly(live, 1)
    proxy.disable()
    live.close()
    wait_for(lambda: len(closed) == 4, what='four on_close calls')
    assert sorted(closed) == [(0, 'counted'), (1, 'counted'), (2, 'counted'), (3, 'counted')]


def test_bare_client_follows_the_last_running_proxy_started(echo_backend):
    first = start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                        http_port=0, behavior='100:hang')
    try:
        second = start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                             http_port=0, behavior='100:blackout')
        assert Client().get_behavior() == '100:blackout'
        stop_proxy(second)
        assert Client().get_behavior() == '100:hang'
    finally:
        stop_proxy(first)
    with pytest.raises(vaurien.VaurienError, match='was stopped'):
        Client()                          # never whatever else listens on 8080


# ---------------------------------------------------------------------------
# handlers/: the scenario modules
# ---------------------------------------------------------------------------

SCENARIOS = {'slow_paths': 'vaurien_handlers.http.slow_paths',
             'status_on_paths': 'vaurien_handlers.http.status_on_paths',
             'loading': 'vaurien_handlers.redis.loading',
             'gone_away': 'vaurien_handlers.mysql.gone_away',
             'busy': 'vaurien_handlers.ldap.busy'}
LOADING_REPLY = b'-LOADING Redis is loading the dataset in memory\r\n'


def scenario_registry():
    """The built-in handlers and those of handlers/, loaded by dotted name as an ini does."""
    return custom_registry(**{name: vaurien.load_callable(dotted)
                              for name, dotted in SCENARIOS.items()})


def http_backend():
    """A keep-alive HTTP/1.1 server answering 200 with the request target as the body;
    records (target, arrival time)."""
    def serve(sock):
        stream = sock.makefile('rb')
        while True:
            line = stream.readline()
            if not line:
                break
            target = line.split()[1]
            backend.requests.append((target, time.monotonic()))
            length = 0
            for header in iter(stream.readline, b'\r\n'):
                if not header:
                    return
                name, _, value = header.partition(b':')
                if name.strip().lower() == b'content-length':
                    length = int(value)
            stream.read(length)
            sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s'
                         % (len(target), target))
    backend = Backend(serve)
    backend.requests = []
    return backend


def resp_backend():
    """A tiny Redis: PING +PONG, GET the value SET, +OK to anything else; records
    (arrival time, command)."""
    def serve(sock):
        stream, values = sock.makefile('rb'), {}
        while True:
            line = stream.readline()
            if not line:
                break
            if line.startswith(b'*'):
                args = []
                for _ in range(int(line[1:])):
                    args.append(stream.read(int(stream.readline()[1:]) + 2)[:-2])
            else:
                args = line.split()
            backend.commands.append((time.monotonic(), args))
            verb = args[0].upper() if args else b''
            if verb == b'PING':
                sock.sendall(b'+PONG\r\n')
            elif verb == b'GET':
                value = values.get(args[1])
                sock.sendall(b'$-1\r\n' if value is None else b'$%d\r\n%s\r\n' % (len(value),
                                                                                    value))
            else:
                if verb == b'SET':
                    values[args[1]] = args[2]
                sock.sendall(b'+OK\r\n')
    backend = Backend(serve)
    backend.commands = []
    return backend


def redis_client(redis, address):
    """redis-py speaking RESP2 (no HELLO), without retries: each BusyLoadingError reaches
    the test."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return redis.Redis(host=address[0], port=address[1], socket_timeout=WAIT,
                       socket_connect_timeout=WAIT, retry=Retry(NoBackoff(), 0), protocol=2)


def mysql_packet(sequence, payload):
    return struct.pack('<I', len(payload))[:3] + bytes((sequence,)) + payload


def read_mysql_packet(read):
    """(sequence, payload) of the next packet from `read(size)`, or None at EOF."""
    head = read(4)
    if len(head) < 4:
        return None
    payload = read(int.from_bytes(head[:3], 'little'))
    return head[3], payload


MYSQL_OK = b'\x00\x00\x00\x02\x00\x00\x00'   # 0 rows, no insert id, autocommit, 0 warnings


def mysql_backend():
    """A tiny MySQL server: a greeting, any login accepted with an OK packet, an OK packet
    to every command until COM_QUIT; records each command's payload.  After an SSLRequest
    (TLS), it echoes the raw bytes instead."""
    caps = 0x1 | 0x4 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000
    greeting = (b'\x0a5.7.0-vaurien-test\x00' + struct.pack('<I', 7) + b'abcdefgh\x00'
                + struct.pack('<HBHH', caps & 0xffff, 0x21, 0x0002, caps >> 16)
                + b'\x15' + b'\x00' * 10 + b'ijklmnopqrst\x00' + b'mysql_native_password\x00')

    def serve(sock):
        stream = sock.makefile('rb')
        sock.sendall(mysql_packet(0, greeting))
        sequence, login = read_mysql_packet(stream.read)
        backend.logins.append(login)
        if len(login) == 32:             # SSLRequest: what follows is TLS, opaque here
            for data in iter(lambda: stream.read1(65536), b''):
                backend.tls.append(data)
                sock.sendall(data)
            return
        sock.sendall(mysql_packet(sequence + 1, MYSQL_OK))
        for _, payload in iter(lambda: read_mysql_packet(stream.read), None):
            backend.commands.append(payload)
            if payload[:1] == b'\x01':   # COM_QUIT
                break
            sock.sendall(mysql_packet(1, MYSQL_OK))
    backend = Backend(serve)
    backend.commands, backend.logins, backend.tls = [], [], []
    return backend


def mysql_login(sock):
    """Read the greeting, log in (a fake handshake response), read the OK."""
    read = lambda size: read_exactly(sock, size)   # noqa: E731
    assert read_mysql_packet(read)[0] == 0
    sock.sendall(mysql_packet(1, b'\x0d\xa2\x0a\x00' + b'\x00' * 4 + b'\x21' + b'\x00' * 23
                              + b'app\x00\x00'))
    assert read_mysql_packet(read) == (2, MYSQL_OK)


def ber(tag, value):
    """A BER element with a definite length, short or long form."""
    if len(value) < 0x80:
        return bytes((tag, len(value))) + value
    return bytes((tag, 0x82)) + struct.pack('!H', len(value)) + value


def ldap_bind(message_id, dn=b'cn=app,dc=example,dc=com'):
    return ber(0x30, ber(0x02, message_id) + ber(0x60, ber(0x02, b'\x03') + ber(0x04, dn)
                                                  + ber(0x80, b'secret')))


def ldap_answer(message_id, tag, code, message=b''):
    return ber(0x30, ber(0x02, message_id) + ber(tag, ber(0x0a, bytes((code,)))
                                                  + ber(0x04, b'') + ber(0x04, message)))


LDAP_SEARCH = ber(0x30, ber(0x02, b'\x01\x2c') + ber(0x63, ber(0x04, b'dc=example,dc=com')
                                                     + b'\x0a\x01\x02\x0a\x01\x00\x02\x01\x00'
                                                     b'\x02\x01\x00\x01\x01\x00'
                                                     + ber(0x87, b'objectClass') + ber(0x30, b'')))
LDAP_UNKNOWN = ber(0x30, ber(0x02, b'\x09') + b'\x70\x00')
LDAP_UNBIND = ber(0x30, ber(0x02, b'\x0a') + b'\x42\x00')


def ldap_backend():
    """A tiny LDAP server: success to a bind (bindResponse) and a search (searchResDone),
    closes at an unbind; bytes that are not LDAP are echoed.  Records each request.  At the
    client's EOF it counts it in `eofs`, and keeps its side open until `hold` is set."""
    def serve(sock):
        buf = b''
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            if buf[:1] != b'\x30':
                sock.sendall(buf)
                buf = b''
                continue
            while len(buf) >= 2:
                size, start = buf[1], 2
                if size & 0x80:
                    start = 2 + (size & 0x7f)
                    size = int.from_bytes(buf[2:start], 'big')
                if len(buf) < start + size:
                    break
                message, buf = buf[:start + size], buf[start + size:]
                backend.requests.append(message)
                id_end = start + 2 + message[start + 1]
                message_id, tag = message[start + 2:id_end], message[id_end]
                if tag == 0x42:
                    return
                sock.sendall(ldap_answer(message_id, {0x60: 0x61}.get(tag, 0x65), 0))
        backend.eofs.append(True)
        backend.hold.wait(WAIT)
        sock.shutdown(socket.SHUT_WR)
    backend = Backend(serve)
    backend.requests, backend.eofs, backend.hold = [], [], threading.Event()
    backend.hold.set()
    return backend


def read_ldap_message(sock):
    head = read_exactly(sock, 2)
    return head + read_exactly(sock, head[1])


def ldap_binds(sock):
    """Bind on `sock`: True when the backend answered success, False when not."""
    sock.sendall(ldap_bind(b'\x01'))
    return read_ldap_message(sock) == ldap_answer(b'\x01', 0x61, 0)


def test_scenario_handlers_load_by_dotted_name_with_typed_defaults():
    expected = {
        'slow_paths': {'pattern': '^/slow', 'sleep': 2.0},
        'status_on_paths': {'pattern': '^/', 'status': 503, 'message': '', 'retry_after': 0},
        'loading': {'warmup': 5.0, 'since': 'handler'},
        'gone_away': {'queries': 0, 'on': 'query'},
        'busy': {'max_connections': 10, 'message': 'server is busy'}}
    for name, dotted in SCENARIOS.items():
        handler = vaurien.Handler(name, vaurien.load_callable(dotted))
        assert handler.settings == expected[name]
        assert handler.summary and handler.schema
        module, _, function = dotted.rpartition('.')             # the module:function form
        assert vaurien.load_callable(module + ':' + function) is handler.func
    configured = vaurien.Handler('busy', vaurien.load_callable('vaurien_handlers.ldap.busy'),
                                 {'max_connections': '3', 'message': 'go away'})
    assert configured.settings == {'max_connections': 3, 'message': 'go away'}
    with pytest.raises(vaurien.ConfigError, match='pattern'):
        vaurien.Handler('slow_paths', vaurien.load_callable('vaurien_handlers.http.slow_paths'),
                        {'pattern': '*oops'})


SCENARIO_BAD_SETTINGS = [
    ('slow_paths', {'pattern': '('}), ('slow_paths', {'pattern': '[a-'}),
    ('slow_paths', {'sleep': -1}), ('slow_paths', {'sleep': 'soon'}),
    ('status_on_paths', {'pattern': '(?P<'}), ('status_on_paths', {'status': 200}),
    ('status_on_paths', {'status': 600}), ('status_on_paths', {'retry_after': -1}),
    ('status_on_paths', {'message': 5}), ('loading', {'warmup': -1}),
    ('loading', {'since': 'later'}), ('gone_away', {'queries': -1}),
    ('gone_away', {'on': 'sometimes'}), ('busy', {'max_connections': 'lots'}),
    ('busy', {'max_connections': -1}), ('busy', {'colour': 'red'}),
]


@pytest.mark.parametrize('name,settings', SCENARIO_BAD_SETTINGS)
def test_scenario_handlers_refuse_bad_settings(make_proxy, echo_backend, name, settings):
    proxy = make_proxy(echo_backend.address, handlers=scenario_registry(), http=True)
    key = list(settings)[0]
    with pytest.raises(vaurien.ConfigError, match=key):
        proxy.set_handler(name, **settings)
    status, answer = api(proxy.control, 'PUT', '/handler',
                         json.dumps({'name': name, 'settings': settings}))
    assert status == 400 and key in answer['error']
    assert proxy.get_handler()['handler'] == 'normal'
    assert round_trip(proxy.address) == b'ping'


def test_slow_paths_delays_the_matching_requests_of_a_keep_alive_connection(make_proxy,
                                                                            backends):
    backend = backends(http_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    proxy.set_handler('slow_paths', pattern=r'^/reports/|[?&]export=', sleep=0.6)
    conn = http.client.HTTPConnection(LOOP, proxy.address[1], timeout=WAIT)
    try:
        for target, slow in [('/reports/q1', True), ('/health', False),
                             ('/items?export=csv', True), ('/reports', False)]:
            started = time.monotonic()
            conn.request('GET', target)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, target.encode())
            arrived = backend.requests[-1][1] - started
            if slow:
                assert arrived >= 0.6, target
            else:
                assert arrived < 0.5, target
        conn.request('POST', '/reports/new', body=b'x' * 200000)   # the body follows
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b'/reports/new')
    finally:
        conn.close()
    assert backend.accepted == 1
    assert [target for target, _ in backend.requests] == [
        b'/reports/q1', b'/health', b'/items?export=csv', b'/reports', b'/reports/new']


def test_status_on_paths_answers_matching_requests_itself_and_closes(make_proxy, backends):
    backend = backends(http_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    proxy.set_handler('status_on_paths', pattern='^/api/payments', retry_after=30)
    with connect(proxy.address) as sock:
        sock.sendall(b'GET /api/payments/1 HTTP/1.1\r\nHost: shop\r\n\r\n')
        assert outcome(sock) == ('eof', b'HTTP/1.1 503 Service Unavailable\r\n'
                                 b'Retry-After: 30\r\n'
                                 b'Content-Type: text/plain; charset=utf-8\r\n'
                                 b'Content-Length: 20\r\nConnection: close\r\n\r\n'
                                 b'Service Unavailable\n')
    assert backend.accepted == 0      # never connected for it
    conn = http.client.HTTPConnection(LOOP, proxy.address[1], timeout=WAIT)
    try:
        conn.request('GET', '/api/users')
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b'/api/users')
        conn.request('GET', '/api/payments?id=2')           # same connection
        response = conn.getresponse()
        assert response.status == 503 and response.getheader('Retry-After') == '30'
        assert response.getheader('Connection') == 'close'
        assert response.read() == b'Service Unavailable\n'
    finally:
        conn.close()
    assert [target for target, _ in backend.requests] == [b'/api/users']
    proxy.set_handler('status_on_paths', pattern='^/', status=429, message='slow down',
                      retry_after=0)
    with connect(proxy.address) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: shop\r\n\r\n')
        assert outcome(sock) == ('eof', b'HTTP/1.1 429 Too Many Requests\r\n'
                                 b'Content-Type: text/plain; charset=utf-8\r\n'
                                 b'Content-Length: 10\r\nConnection: close\r\n\r\n'
                                 b'slow down\n')
    if not shutil.which('curl'):
        pytest.skip('curl is not installed (apt-get install curl)')
    proxy.set_handler('status_on_paths', pattern='^/api/payments', status=502, retry_after=5)
    result = subprocess.run(['curl', '-s', '-D', '-', 'http://%s:%d/api/payments' % proxy.address],
                            capture_output=True, timeout=WAIT)
    assert result.stdout.startswith(b'HTTP/1.1 502 Bad Gateway\r\nRetry-After: 5\r\n')
    assert result.stdout.endswith(b'\r\n\r\nBad Gateway\n')
    result = subprocess.run(['curl', '-s', 'http://%s:%d/api/users' % proxy.address],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.stdout == '/api/users'


def test_loading_answers_loading_until_the_warmup_then_relays(make_proxy, backends):
    redis = pytest.importorskip('redis')
    backend = backends(resp_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    started = time.monotonic()
    proxy.set_handler('loading', warmup=1.0)
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(connect(proxy.address))
        live.sendall(b'PING\r\n*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n')
        assert read_exactly(live, 3 * len(LOADING_REPLY)) == 3 * LOADING_REPLY
        cut = stack.enter_context(connect(proxy.address))
        cut.sendall(b'*1\r\n$4\r\nPI')                     # a command begun while loading
        db = redis_client(redis, proxy.address)
        stack.callback(db.close)
        with pytest.raises(redis.exceptions.BusyLoadingError):
            db.set('k', 'v')

        def pings():
            try:
                return db.ping()
            except redis.exceptions.BusyLoadingError:
                return False
        wait_for(pings, what='the end of the warmup')
        assert time.monotonic() - started >= 1.0
        assert backend.commands and all(when - started >= 1.0 for when, _ in backend.commands)
        cut.sendall(b'NG\r\nPING\r\n')                     # its end still gets LOADING
        assert read_exactly(cut, len(LOADING_REPLY) + 7) == LOADING_REPLY + b'+PONG\r\n'
        live.sendall(b'GET k\r\n')                         # the SET never reached it
        assert read_exactly(live, 5) == b'$-1\r\n'
        assert db.set('k', 'v') and db.get('k') == b'v'
        proxy.set_handler('loading', warmup=WAIT)          # a restart: live ones see it
        live.sendall(b'GET k\r\n')
        assert read_exactly(live, len(LOADING_REPLY)) == LOADING_REPLY
        with pytest.raises(redis.exceptions.BusyLoadingError):
            db.get('k')
        assert [args for _, args in backend.commands if args[:1] == [b'GET']] == [
            [b'GET', b'k'], [b'GET', b'k']]


def test_loading_since_connection_starts_the_clock_at_each_connect(make_proxy, backends):
    redis = pytest.importorskip('redis')
    backend = backends(resp_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    proxy.set_handler('loading', warmup=0.5, since='connection')

    def ask(sock):
        sock.sendall(b'PING\r\n')
        first = read_exactly(sock, 1)
        return first + read_exactly(sock, (len(LOADING_REPLY) if first == b'-' else 7) - 1)
    started = time.monotonic()
    with connect(proxy.address) as old:
        assert ask(old) == LOADING_REPLY
        wait_for(lambda: ask(old) == b'+PONG\r\n', what='the connection to warm up')
        assert time.monotonic() - started >= 0.5
        with connect(proxy.address) as new:
            assert ask(new) == LOADING_REPLY
            assert ask(old) == b'+PONG\r\n'
    db = redis_client(redis, proxy.address)
    try:
        with pytest.raises(redis.exceptions.BusyLoadingError):
            db.ping()
    finally:
        db.close()


def test_loading_through_an_ini_file_and_the_command_line(tmp_path, backends, cli_proxy):
    backend = backends(resp_backend)
    ini = write(tmp_path, 'redis.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:loading\n'
                '[handler:loading]\ncallable = vaurien_handlers.redis.loading\nwarmup = 2\n'
                'since = handler\n' % backend.address)
    listing = run_cli('--config', ini, '--list-handlers')
    assert listing.returncode == 0
    assert 'loading: Answers -LOADING to every command' in listing.stdout
    assert '        configured: 2.0' in listing.stdout
    started = time.monotonic()
    proc = cli_proxy('--config', ini)
    with connect(proc.address) as sock:
        sock.sendall(b'PING\r\n')
        assert read_exactly(sock, len(LOADING_REPLY)) == LOADING_REPLY
    if shutil.which('redis-cli'):
        result = subprocess.run(['redis-cli', '-h', LOOP, '-p', str(proc.address[1]), 'GET', 'k'],
                                capture_output=True, text=True, timeout=WAIT)
        assert 'LOADING Redis is loading the dataset in memory' in result.stdout
    assert not backend.commands
    wait_for(lambda: round_trip(proc.address, b'PING\r\n') == b'+PONG\r\n', what='the warmup')
    assert time.monotonic() - started >= 2.0
    assert Client(*proc.control).get_handler()['settings'] == {'warmup': 2.0,
                                                               'since': 'handler'}
    for section, message in [('[handler:busy]\ncallable = vaurien_handlers.ldap.busy\n'
                              'max_connections = lots\n', 'max_connections = lots'),
                             ('[handler:slow]\ncallable = vaurien_handlers.http.slow_paths\n'
                              'pattern = (\n', 'not a regular expression'),
                             ('[handler:x]\ncallable = vaurien_handlers.redis.nothing\n',
                              "no attribute 'nothing'")]:
        bad = write(tmp_path, 'bad.ini', '[vaurien]\ndistant = %s:%d\n%s'
                    % (backend.address + (section,)))
        result = run_cli('--config', bad)
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.count('\n') == 1


def test_gone_away_pymysql_loses_the_connection_at_the_next_query(make_proxy, backends):
    pymysql = pytest.importorskip('pymysql')
    backend = backends(mysql_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())

    def close(db):
        with contextlib.suppress(pymysql.err.Error):   # "Already closed" after a loss
            db.close()

    def connect_db():
        return pymysql.connect(host=LOOP, port=proxy.address[1], user='app', password='',
                               connect_timeout=WAIT, read_timeout=WAIT, write_timeout=WAIT)
    close(connect_db())                  # normal: how many queries does connect() send?
    login_queries = sum(1 for payload in backend.commands if payload[:1] == b'\x03')
    backend.commands.clear()
    proxy.set_handler('gone_away', queries=login_queries + 1)
    db = connect_db()
    try:
        cursor = db.cursor()
        cursor.execute('SELECT 1')
        with pytest.raises(pymysql.err.OperationalError) as caught:
            cursor.execute('SELECT 2')
        assert caught.value.args[0] == 2013
    finally:
        close(db)
    queries = [payload[1:] for payload in backend.commands if payload[:1] == b'\x03']
    assert queries[-1] == b'SELECT 1' and b'SELECT 2' not in queries
    proxy.set_handler('gone_away')       # the default: the first query after the login
    with pytest.raises(pymysql.err.OperationalError) as caught:
        connect_db().cursor().execute('SELECT 3')
    assert caught.value.args[0] == 2013
    proxy.set_handler('gone_away', queries=login_queries, on='any')
    db = connect_db()
    try:
        with pytest.raises(pymysql.err.OperationalError) as caught:
            db.ping(reconnect=False)
        assert caught.value.args[0] == 2013
    finally:
        close(db)
    assert b'\x0e' not in backend.commands           # COM_PING never reached it
    proxy.set_handler('gone_away', queries=login_queries, on='query')
    db = connect_db()
    try:
        db.ping(reconnect=False)                      # other commands pass
        with pytest.raises(pymysql.err.OperationalError) as caught:
            db.cursor().execute('SELECT 4')
        assert caught.value.args[0] == 2013
    finally:
        close(db)
    assert b'\x0e' in backend.commands
    assert all(b'SELECT 3' not in payload and b'SELECT 4' not in payload
               for payload in backend.commands)


def test_gone_away_on_the_wire_eof_without_an_answer_and_tls_untouched(make_proxy, backends):
    backend = backends(mysql_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry(),
                       behavior='100:gone_away')
    with connect(proxy.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mysql_login(sock)
        sock.sendall(mysql_packet(0, b'\x0e'))                       # COM_PING passes
        assert read_exactly(sock, 4 + len(MYSQL_OK)) == mysql_packet(1, MYSQL_OK)
        for byte in mysql_packet(0, b'\x03SELECT 1'):                # in 1-byte segments
            sock.sendall(bytes((byte,)))
        assert outcome(sock) == ('eof', b'')
    wait_for(lambda: not backend.live, what='the backend connection to end')
    assert backend.commands == [b'\x0e']
    with connect(proxy.address) as sock:
        read_mysql_packet(lambda size: read_exactly(sock, size))
        sock.sendall(mysql_packet(1, b'\x0d\xaa\x0a\x00' + b'\x00' * 28))   # SSLRequest
        wait_for(lambda: len(backend.logins) == 2, what='the SSLRequest')
        opaque = mysql_packet(0, b'\x03SELECT 1') + b'\x16\x03\x01' + os.urandom(64)
        sock.sendall(opaque)
        assert read_exactly(sock, len(opaque)) == opaque            # echoed: relayed as is
        sock.shutdown(socket.SHUT_WR)
        assert outcome(sock) == ('eof', b'')
    assert b''.join(backend.tls) == opaque


def test_busy_answers_busy_beyond_max_connections_and_serves_again(make_proxy, backends):
    backend = backends(ldap_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    proxy.set_handler('busy', max_connections=2, message='try later')
    busy_bind = ldap_answer(b'\x01', 0x61, 51, b'try later')
    assert busy_bind == b'\x30\x15\x02\x01\x01\x61\x10\x0a\x01\x33\x04\x00\x04\x09try later'
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(connect(proxy.address)) for _ in range(2))
        assert ldap_binds(first) and ldap_binds(second)
        with connect(proxy.address) as third:               # pipelined: one answer each
            third.sendall(ldap_bind(b'\x01') + LDAP_SEARCH + LDAP_UNKNOWN + LDAP_UNBIND)
            assert outcome(third) == ('eof', busy_bind
                                      + ldap_answer(b'\x01\x2c', 0x65, 51, b'try later')
                                      + ldap_answer(b'\x09', 0x78, 51, b'try later'))
        with connect(proxy.address) as fourth:              # a bind in 1-byte segments
            fourth.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in ldap_bind(b'\x01'):
                fourth.sendall(bytes((byte,)))
            assert outcome(fourth) == ('eof', busy_bind)
        assert len(backend.requests) == 2                   # the two binds served
        big = ldap_bind(b'\x02', b'cn=' + b'x' * 300 + b',dc=example,dc=com')
        first.sendall(big + LDAP_SEARCH)                    # served: relayed intact
        assert read_ldap_message(first) == ldap_answer(b'\x02', 0x61, 0)
        assert read_ldap_message(first) == ldap_answer(b'\x01\x2c', 0x65, 0)
        assert backend.requests[-2:] == [big, LDAP_SEARCH]
        first.shutdown(socket.SHUT_WR)                      # the first one leaves...
        assert outcome(first) == ('eof', b'')
        assert ldap_binds(stack.enter_context(connect(proxy.address)))   # ...one is served
        rst_close(second)                                   # a reset ends it too
        wait_for(lambda: proxy.connection_count == 1, what='the reset connection to end')
        one, two = (stack.enter_context(connect(proxy.address)) for _ in range(2))
        assert ldap_binds(one) and not ldap_binds(two)
        assert outcome(two) == ('eof', b'')


def test_busy_counts_exactly_per_proxy_however_connections_end(make_proxy, backends):
    backend = backends(ldap_backend)
    proxy = make_proxy(backend.address, handlers=scenario_registry())
    other = make_proxy(backend.address, handlers=scenario_registry())
    proxy.set_handler('busy', max_connections=1)
    other.set_handler('busy', max_connections=1)
    busy_bind = ldap_answer(b'\x01', 0x61, 51, b'server is busy')
    with contextlib.ExitStack() as stack:
        stack.callback(backend.hold.set)
        served = stack.enter_context(connect(proxy.address))
        assert ldap_binds(served)
        assert ldap_binds(stack.enter_context(connect(other.address)))   # counted apart
        refused = stack.enter_context(connect(proxy.address))
        refused.sendall(ldap_bind(b'\x01'))
        assert read_exactly(refused, len(busy_bind)) == busy_bind
        assert outcome(refused) == ('eof', b'')   # and left open: the proxy lingers on it
        backend.hold.clear()              # the backend keeps its side open for a while...
        served.shutdown(socket.SHUT_WR)   # ...but a client that closed its side is gone
        wait_for(lambda: backend.eofs, what='the EOF to reach the backend')
        assert ldap_binds(stack.enter_context(connect(proxy.address)))   # at once
        backend.hold.set()
        assert outcome(served) == ('eof', b'')
        proxy.disable()                                     # kills every connection
        wait_for(lambda: proxy.connection_count == 0, what='the killed connections to end')
        proxy.enable()
        assert ldap_binds(stack.enter_context(connect(proxy.address)))
        proxy.set_handler('busy', max_connections=0)
        assert not ldap_binds(stack.enter_context(connect(proxy.address)))
        tls = b'\x16\x03\x01\x00\x05hello'                   # not LDAP: relayed untouched
        opaque = stack.enter_context(connect(proxy.address))
        opaque.sendall(tls)
        assert read_exactly(opaque, len(tls)) == tls
        proxy.set_handler('normal')
    wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    with contextlib.ExitStack() as stack:   # opened under another handler: counted once met
        olds = [stack.enter_context(connect(proxy.address)) for _ in range(3)]
        assert all(ldap_binds(old) for old in olds)
        proxy.set_handler('busy', max_connections=2)
        answers = []
        for old in olds:                                    # one after the other
            old.sendall(LDAP_SEARCH)
            answers.append(read_ldap_message(old))
        assert answers == [ldap_answer(b'\x01\x2c', 0x65, 0)] * 2 + [
            ldap_answer(b'\x01\x2c', 0x65, 51, b'server is busy')]
        assert outcome(olds[2]) == ('eof', b'')


def test_readme_and_ci_run_the_same_test_command():
    with open(os.path.join(HERE, 'README.txt')) as readme, \
            open(os.path.join(HERE, '.ci', 'run')) as ci:
        command = ci.read().strip().splitlines()[-1]
        assert command.startswith('python3 -m venv .venv && ') and command in readme.read()


# ---------------------------------------------------------------------------
# Regressions found in review
# ---------------------------------------------------------------------------

def proc_cpu_seconds(pid):
    fields = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def test_a_stalled_reader_does_not_make_the_pump_spin(cli_proxy):
    def firehose(sock):
        with contextlib.suppress(OSError):
            while True:
                sock.sendall(b'z' * 65536)
    backend = Backend(firehose)
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address)
        with connect(proc.address) as sock:
            sock.sendall(b'go')
            time.sleep(0.5)                       # buffers fill; nobody reads
            before = proc_cpu_seconds(proc.process.pid)
            time.sleep(1.0)
            assert proc_cpu_seconds(proc.process.pid) - before < 0.3
    finally:
        backend.close()


def test_a_backend_reset_reaches_the_client_as_a_reset_after_the_data(make_proxy):
    def answer_then_reset(sock):
        sock.recv(100)
        sock.sendall(b'partial answer')
        time.sleep(0.1)
        rst_close(sock)
    backend = Backend(answer_then_reset)
    try:
        proxy = make_proxy(backend.address)
        with connect(proxy.address) as sock:
            sock.sendall(b'question')
            assert outcome(sock) == ('rst', b'partial answer')
    finally:
        backend.close()


def test_closing_waits_for_a_slow_but_steady_reader(make_proxy, monkeypatch):
    monkeypatch.setattr(vaurien, 'LINGER', 0.3)   # shorter than the reader needs
    payload = os.urandom(6_000_000)

    def stream(sock):
        sock.recv(100)
        sock.sendall(payload)
        read_all(sock)
    backend = Backend(stream)
    try:
        proxy = make_proxy(backend.address)
        proxy.set_handler('limit_data', bytes=len(payload))
        with connect(proxy.address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b'go')
            received = bytearray()
            while True:                           # 2 MB/s: 3 s, far past LINGER
                data = sock.recv(40000)
                if not data:
                    break
                received += data
                time.sleep(0.02)
        assert bytes(received) == payload
    finally:
        backend.close()


def test_stop_cancels_a_pending_flap_refusal(echo_backend):
    proxy = Proxy(LOOP + ':0', '%s:%d' % echo_backend.address).start()
    proxy.set_handler('flap', up=0.1, down=0.5, mode='refuse')
    time.sleep(max(0.0, proxy.epoch[1] + 0.2 - time.monotonic()))
    with contextlib.suppress(OSError):
        outcome(connect(proxy.address), deadline=1)   # finds the outage
    wait_for(lambda: not proxy.enabled, what='the refusal')
    proxy.stop()
    time.sleep(0.8)
    assert not proxy.enabled
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.address)


def test_transient_fails_without_a_backend_and_spares_live_connections(make_proxy,
                                                                      echo_backend,
                                                                      dead_port):
    live = None
    proxy = make_proxy((LOOP, dead_port))
    proxy.set_handler('transient', count=1, protocol='http')
    with connect(proxy.address) as sock:      # the backend is down: still a clean 503
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert outcome(sock)[1].startswith(b'HTTP/1.1 503 ')
    proxy = make_proxy(echo_backend.address)
    live = connect(proxy.address)
    live.sendall(b'a')
    assert read_exactly(live, 1) == b'a'
    proxy.set_handler('transient', count=1)
    assert round_trip(proxy.address, b'*1\r\n$4\r\nPING\r\n').startswith(b'-ERR')
    live.sendall(b'b')                        # opened before: passes
    assert read_exactly(live, 1) == b'b'
    live.close()
    assert echo_backend.accepted == 1         # the failing one never reached it


def test_enabling_on_a_taken_port_is_a_409(proxy):
    port = proxy.address[1]
    proxy.disable()
    squatter = socket.create_server((LOOP, port))
    try:
        status, answer = api(proxy.control, 'PUT', '/proxy', '{"enabled": true}')
        assert status == 409 and 'cannot listen' in answer['error']
    finally:
        squatter.close()
    assert Client(*proxy.control).enable()['enabled'] is True


def test_proxy_and_client_calls_return_the_same_things(proxy):
    client = Client(*proxy.control)
    for call, args in (('get_handler', ()), ('set_handler', ('delay',)),
                       ('get_behavior', ()), ('set_behavior', ('20:hang',)),
                       ('list_handlers', ()), ('status', ()), ('disable', ()), ('enable', ())):
        from_proxy = getattr(proxy, call)(*args)
        from_client = getattr(client, call)(*args)
        if call in ('status', 'disable', 'enable'):
            from_proxy.pop('accepted'), from_client.pop('accepted')
        assert from_proxy == from_client, call


def test_start_proxy_reports_a_proxy_that_never_gets_ready(tmp_path):
    with pytest.raises(vaurien.VaurienError, match='not ready after 0.01 s'):
        start_proxy(distant='127.0.0.1:9', local=LOOP + ':0', http_port=0, timeout=0.01)


def test_the_example_ini_files_load(tmp_path):
    """Every examples/*.ini reads cleanly and registers what it names."""
    folder = os.path.join(HERE, 'examples')
    for name in sorted(os.listdir(folder)):
        if name.endswith('.ini'):
            result = run_cli('--config', os.path.join(folder, name), '--list-handlers')
            assert result.returncode == 0, (name, result.stderr)
    listing = run_cli('--config', os.path.join(folder, 'redis-warmup.ini'),
                      '--list-handlers').stdout
    assert 'loading: ' in listing and 'configured: 3.0' in listing


# ---------------------------------------------------------------------------
# Hardening: the adversarial review's defects, each with its regression test
# ---------------------------------------------------------------------------

def stream_backend(size):
    """A backend that sends `size` bytes at once, then closes."""
    def serve(sock):
        sock.sendall(b'z' * size)
        sock.shutdown(socket.SHUT_WR)
        read_all(sock, 60)
    return Backend(serve)


def idle_cpu(pid, seconds=1.0):
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def test_a_closing_connection_waits_for_its_slow_reader_without_spinning(cli_proxy):
    backend = stream_backend(16 << 20)
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address)
        # the replies flow until the timeout closes the connection: a megabyte is queued
        Client(*proc.control).set_handler('timeout', timeout=0.5, direction='to_backend')
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(proc.address)
            time.sleep(2)     # timed out, linger over: closing, bytes still queued for us
            assert idle_cpu(proc.process.pid) < 0.3
            data = read_all(sock, 60)
            assert len(data) > 1 << 20 and data == b'z' * len(data)
    finally:
        backend.close()


def test_slicing_into_one_byte_pieces_keeps_memory_flat(cli_proxy):
    backend = stream_backend(4 << 20)
    try:
        proc = cli_proxy('--distant', '%s:%d' % backend.address)
        Client(*proc.control).set_handler('slicer', size=1, delay=0.0001)
        before = proc_rss(proc.process.pid)
        with connect(proc.address) as sock:
            got = read_exactly(sock, 2000)
            time.sleep(0.5)
            assert proc_rss(proc.process.pid) - before < 30 << 20   # was 360 MB
            assert got == b'z' * 2000
            # every piece is a send: the other connections keep their pace meanwhile
            Client(*proc.control).set_handler('normal')
    finally:
        backend.close()


def token_proxy(cli_proxy, echo_backend, token):
    return cli_proxy('--distant', '%s:%d' % echo_backend.address, '--http-token', token)


def test_tokens_are_bytes_their_scheme_any_case_and_never_empty(cli_proxy, echo_backend):
    proc = token_proxy(cli_proxy, echo_backend, 'sécret-日本')
    assert Client(*proc.control, token='sécret-日本').status()['enabled'] is True
    for header, status in ((b'bearer s\xc3\xa9cret-\xe6\x97\xa5\xe6\x9c\xac', 200),
                           (b'Bearer s\xe9cret', 401), (b'Bearer \xff\xfe', 401),
                           (b'Basic s\xc3\xa9cret-\xe6\x97\xa5\xe6\x9c\xac', 401)):
        with socket.create_connection(proc.control, timeout=WAIT) as sock:
            sock.sendall(b'GET /proxy HTTP/1.1\r\nHost: x\r\nAuthorization: ' + header +
                         b'\r\nConnection: close\r\n\r\n')
            answer = read_all(sock)
        assert answer.startswith(b'HTTP/1.1 %d ' % status), answer
        assert json.loads(answer.partition(b'\r\n\r\n')[2])['status' if status != 200
                                                             else 'enabled']
    result = run_cli('--distant', 'a:1', '--http-token', '')
    assert result.returncode == 2 and 'http-token' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def fake_postgresql(sock):
    """Enough of a PostgreSQL server for a client to log in and send queries."""
    def message(kind, payload):
        return kind + struct.pack('!I', len(payload) + 4) + payload
    head = read_exactly(sock, 8)
    if head[4:8] == struct.pack('!I', 80877103):     # SSLRequest
        sock.sendall(b'N')
        head = read_exactly(sock, 8)
    read_exactly(sock, struct.unpack('!I', head[:4])[0] - 8)
    sock.sendall(message(b'R', struct.pack('!I', 0)) + b''.join(
        message(b'S', b'%s\x00%s\x00' % pair) for pair in (
            (b'server_version', b'16.0'), (b'client_encoding', b'UTF8'),
            (b'integer_datetimes', b'on'))) +
        message(b'K', struct.pack('!II', 1, 2)) + message(b'Z', b'I'))
    while True:
        head = sock.recv(5)
        if not head or head[:1] == b'X':
            return
        read_exactly(sock, struct.unpack('!I', head[1:5])[0] - 4)
        sock.sendall(message(b'I', b'') + message(b'Z', b'I'))   # empty query response


def test_errors_answers_a_live_postgresql_connection_in_postgresql(make_proxy):
    """A pooled connection, logged in before `errors` is set, gets a FATAL, as from a
    server that terminates it (it was 64 random bytes: "lost synchronization")."""
    backend = Backend(fake_postgresql)
    try:
        proxy = make_proxy(backend.address)
        with connect(proxy.address) as sock:
            sock.sendall(struct.pack('!II', 8, 80877103))
            assert read_exactly(sock, 1) == b'N'
            startup = struct.pack('!I', 196608) + b'user\x00u\x00\x00'
            sock.sendall(struct.pack('!I', len(startup) + 4) + startup)
            assert read_all_until(sock, b'Z\x00\x00\x00\x05I')
            with proxy.with_handler('errors'):
                sock.sendall(b'Q\x00\x00\x00\rSELECT 1\x00')
                kind, answer = outcome(sock)
        assert kind == 'eof' and answer.startswith(b'E') and b'SFATAL\x00' in answer
        assert b'C53300\x00' in answer
    finally:
        backend.close()


def read_all_until(sock, end):
    data = b''
    while not data.endswith(end):
        more = sock.recv(4096)
        if not more:
            raise EOFError(data)
        data += more
    return data


def greeting_backend(greeting):
    def serve(sock):
        sock.sendall(greeting)
        read_all(sock)
    return Backend(serve)


MYSQL_GREETING = b'\x0a\x00\x00\x00\x0a5.5.5-fake\x00' + b'\x00' * 5


@pytest.mark.parametrize('greeting,request_bytes,answer', [
    (MYSQL_GREETING, b'\x09\x00\x00\x00\x03SELECT 1',
     b'\x1d\x00\x00\x01\xff\x10\x04#HY000Too many connections'),
    (b'220 mail.example ESMTP\r\n', b'EHLO me\r\n',
     b'421 4.3.2 Service not available, closing transmission channel\r\n'),
], ids=['mysql', 'smtp'])
def test_errors_knows_a_server_that_speaks_first_from_its_greeting(make_proxy, greeting,
                                                                    request_bytes, answer):
    backend = greeting_backend(greeting)
    try:
        proxy = make_proxy(backend.address)
        with connect(proxy.address) as sock:
            assert read_exactly(sock, len(greeting)) == greeting
            with proxy.with_handler('errors'):
                sock.sendall(request_bytes)
                assert outcome(sock) == ('eof', answer)
    finally:
        backend.close()


def send_in_pieces(address, pieces, pause=0.05):
    with connect(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        return outcome(sock)


@pytest.mark.parametrize('pieces,answer', [
    ([b'ge', b't k\r\n'], b'SERVER_ERROR Service Unavailable\r\n'),
    ([b'PI', b'NG\r\n'], b'-ERR Service Unavailable\r\n'),
    ([b'PROPFIND /d HTTP/1.1\r\nHost: a\r\n\r\n'], b'HTTP/1.1 503 '),
    ([b'PUR', b'GE /cache HTTP/1.1\r\nHost: a\r\n\r\n'], b'HTTP/1.1 503 '),
    ([b'\x00\x00', b'\x00\x08\x04\xd2\x16\x2f'], b'N'),       # an SSLRequest, cut
], ids=['memcache', 'redis-inline', 'propfind', 'purge', 'postgresql'])
def test_errors_waits_for_a_whole_first_line_and_knows_any_http_method(make_proxy,
                                                                        echo_backend,
                                                                        pieces, answer):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    kind, data = send_in_pieces(proxy.address, pieces)
    assert data.startswith(answer), data
    assert kind == 'eof' or answer == b'N'


def test_errors_answers_a_client_still_uploading_slowly(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, behavior='100:errors')
    with connect(proxy.address) as sock:
        sock.sendall(b'POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 300000\r\n\r\n')
        for _ in range(15):      # 1.5 s of upload: longer than the linger
            sock.sendall(b'u' * 20000)
            time.sleep(0.1)
        assert read_all(sock).startswith(b'HTTP/1.1 503 ')


def test_a_timeout_switched_off_on_a_live_connection_never_closes_it(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    with connect(proxy.address) as sock:
        with proxy.with_handler('timeout', timeout=0.5):
            sock.sendall(b'swallowed')
            time.sleep(0.1)
        time.sleep(1)            # past the timeout of the handler no longer in force
        sock.sendall(b'ping')
        assert read_exactly(sock, 4) == b'ping'


def test_start_twice_then_stop_then_start_again(echo_backend):
    proxy = Proxy(LOOP + ':0', '%s:%d' % echo_backend.address)
    proxy.start()
    proxy.start()
    with proxy:
        assert round_trip(proxy.address) == b'ping'
    used = time.process_time()
    time.sleep(1)
    assert time.process_time() - used < 0.3     # no accept loop spinning after stop()
    proxy.start()
    try:
        assert round_trip(proxy.address) == b'ping'
    finally:
        proxy.stop()


def test_settings_fatal_in_arithmetic_are_harmless(make_proxy, echo_backend, caplog):
    proxy = make_proxy(echo_backend.address)
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        with proxy.with_handler('corrupt', ratio=1e-17, direction='both'):
            assert round_trip(proxy.address) == b'ping'
        with proxy.with_handler('delay', sleep=3e6), connect(proxy.address) as held:
            held.sendall(b'in a month')
            other = make_proxy(echo_backend.address)
            for _ in range(3):          # the pump goes on: no overflow in its wait
                assert round_trip(other.address) == b'ping'
    assert caplog.text == ''


def test_a_code_of_another_protocol_falls_back_to_mysqls_own(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.handlers['errors'].settings = proxy.handlers['errors'].validate({'code': 'XX000'})
    proxy.set_handler('transient', protocol='mysql')
    with connect(proxy.address) as sock:
        kind, data = outcome(sock)
    assert kind == 'eof' and data[4:7] == b'\xff\x10\x04'     # ERR 1040


def delayed_reply_backend():
    def serve(sock):
        sock.recv(100)
        sock.sendall(b'first part;')
        time.sleep(0.3)
        sock.sendall(b'second part')
        read_all(sock)
    return Backend(serve)


@pytest.mark.parametrize('held_by', ['handler', 'fault'])
@pytest.mark.parametrize('how', ['disable', 'stop', 'down'])
def test_a_reply_cut_by_disable_or_stop_is_reset_never_a_clean_eof(make_proxy, how, held_by):
    backend = delayed_reply_backend()
    try:
        proxy = make_proxy(backend.address)
        if held_by == 'fault':
            proxy.add_fault('delay', sleep=0.5, direction='To_Client')   # any case
        else:
            proxy.set_handler('delay', sleep=0.5, direction='to_client')
        with connect(proxy.address) as sock:
            sock.sendall(b'question')
            assert read_exactly(sock, 11) == b'first part;'   # the second is held back
            if how == 'down':
                with proxy.down():
                    assert outcome(sock)[0] == 'rst'
            else:
                getattr(proxy, how)()
                assert outcome(sock)[0] == 'rst'
    finally:
        backend.close()


@pytest.mark.parametrize('held_for', ['client', 'backend'])
def test_bytes_a_blocking_handler_holds_are_reset_when_stop_cuts_them(make_proxy, held_for):
    """The worker's calls hold bytes as a queue does: stop() meanwhile resets the side
    they were for, as with a delay, never a clean EOF."""
    received, holding = [], threading.Event()

    def serve(sock):
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(100)
                received.append(data or 'eof')
                if data == b'question':
                    sock.sendall(b'held answer')
                if not data:
                    return
        received.append('rst')
    backend = Backend(serve)

    def sleepy(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data.startswith(b'held'):
            holding.set()
            time.sleep(1.0)
        dest.sendall(data)
    try:
        proxy = make_proxy(backend.address, handlers={'sleepy': sleepy})
        proxy.set_handler('sleepy')
        with connect(proxy.address) as sock:
            if held_for == 'client':
                sock.sendall(b'question')
            else:
                sock.sendall(b'sent;')
                wait_for(lambda: received == [b'sent;'], what='the first bytes')
                sock.sendall(b'held')
            assert holding.wait(WAIT)
            proxy.stop()
            if held_for == 'client':
                assert outcome(sock)[0] == 'rst'
            else:
                wait_for(lambda: received[-1] in ('eof', 'rst'), what='the end')
                assert received == [b'sent;', 'rst']
    finally:
        backend.close()


@pytest.mark.parametrize('held_by', ['handler', 'fault'])
def test_an_eof_alone_held_when_stop_cuts_in_is_a_clean_eof(make_proxy, held_by):
    """No byte waits, only the EOF (slow_close holds it): stop() passes a clean EOF."""
    received = []

    def serve(sock):
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(100)
                received.append(data or 'eof')
                if not data:
                    return
        received.append('rst')
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        if held_by == 'fault':
            proxy.add_fault('slow_close', delay=5, direction='to_backend')
        else:
            proxy.set_handler('slow_close', delay=5)
        with connect(proxy.address) as sock:
            sock.sendall(b'hi')
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: received == [b'hi'], what='the bytes before the EOF')
            time.sleep(0.1)      # the EOF is with the proxy, held
            proxy.stop()
            wait_for(lambda: received[-1] in ('eof', 'rst'), what='the end')
            assert received == [b'hi', 'eof']
    finally:
        backend.close()


def raw_api(address, request):
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(request)
        return read_all(sock)


@pytest.mark.parametrize('request_bytes,status', [
    (b'OPTIONS /handler HTTP/1.1\r\nHost: a\r\n\r\n', 405),
    (b'BREW /handler HTTP/1.1\r\nHost: a\r\n\r\n', 501),
    (b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n', 414),
    (b'GET /proxy HTTP/1.1\r\nX-Long: ' + b'a' * 70000 + b'\r\n\r\n', 431),
    (b'GET /proxy HTTP/1.1\r\n' + b''.join(b'X-%d: 1\r\n' % i for i in range(101)) + b'\r\n',
     431),
    (b'GET /proxy HTTP/2.0\r\n\r\n', 505),
    (b'GET /proxy nonsense\r\n\r\n', 400),
    (b'GET /proxy\r\n\r\n', 505),
], ids=['options', 'unknown-method', 'long-line', 'long-header', 'many-headers', 'http2',
        'bad-version', 'http0.9'])
def test_every_control_api_refusal_is_json(proxy, request_bytes, status):
    answer = raw_api(proxy.control, request_bytes)
    head, _, body = answer.partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 %d ' % status), answer[:200]
    assert json.loads(body)['status'] == status


def test_a_get_with_a_body_smuggles_no_request(proxy):
    hidden = json.dumps({'name': 'errors'}).encode()
    smuggled = (b'PUT /handler HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n'
                % len(hidden)) + hidden
    answer = raw_api(proxy.control, b'GET /handler HTTP/1.1\r\nHost: a\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(smuggled) + smuggled)
    assert answer.startswith(b'HTTP/1.1 400 ') and answer.count(b'HTTP/1.1') == 1
    assert proxy.get_handler()['handler'] == 'normal'


@pytest.mark.parametrize('length', [b'0_6', b'-1', b'\xd9\xa3'])
def test_a_content_length_is_ascii_digits(proxy, length):
    answer = raw_api(proxy.control, b'PUT /handler HTTP/1.1\r\nHost: a\r\n'
                     b'Content-Length: ' + length + b'\r\n\r\nnormal')
    assert answer.startswith(b'HTTP/1.1 400 ')


def test_the_control_api_gives_each_request_a_total_deadline(proxy, monkeypatch):
    monkeypatch.setattr(vaurien.ControlHandler, 'timeout', 1)
    with socket.create_connection(proxy.control, timeout=WAIT) as sock:
        sock.setblocking(False)
        started, closed = time.monotonic(), False
        for byte in b'GET /proxy HTTP/1.1\r\n' + b'X-a: b\r\n' * 8:   # 8.5 s of bytes
            time.sleep(0.1)          # a byte every 0.1 s: each read is quick
            try:
                sock.send(bytes([byte]))
                closed = sock.recv(1, socket.MSG_PEEK) == b''
            except BlockingIOError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed and time.monotonic() - started < 5


def test_each_request_of_a_keep_alive_connection_has_its_deadline(proxy, monkeypatch):
    monkeypatch.setattr(vaurien.ControlHandler, 'timeout', 1)
    with socket.create_connection(proxy.control, timeout=WAIT) as sock:
        for _ in range(3):                  # answered, one after the other, 0.5 s apart
            sock.sendall(b'GET /proxy HTTP/1.1\r\nHost: a\r\n\r\n')
            answer = b''
            while not answer.endswith(b'}\n'):
                answer += sock.recv(65536)
            assert answer.startswith(b'HTTP/1.1 200 ')
            time.sleep(0.5)
        started = time.monotonic()
        sock.sendall(b'GET /proxy HTTP/1.1\r\n')          # then one never finished
        assert outcome(sock)[0] in ('eof', 'rst') and time.monotonic() - started < 5


def test_keep_alive_requests_are_all_answered_on_one_connection(proxy):
    conn = http.client.HTTPConnection(*proxy.control, timeout=WAIT)
    try:
        for _ in range(3):
            conn.request('GET', '/proxy')
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())['enabled']
            sock = conn.sock
        conn.request('GET', '/handler')
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_in_process_options_are_checked_as_on_the_command_line(echo_backend):
    distant = '%s:%d' % echo_backend.address
    for options in ({'connect_timeout': 0}, {'max_connections': -1},
                    {'connect_timeout': 'soon'}, {'http_token': ''}, {'seed': -3}):
        with pytest.raises(vaurien.ConfigError, match=list(options)[0]):
            Proxy(LOOP + ':0', distant, **options)
    proxy = Proxy(LOOP + ':0', distant, connect_timeout='5', max_connections='3')
    try:
        assert (proxy.connect_timeout, proxy.max_connections) == (5.0, 3)
    finally:
        proxy.server_close()


def test_flap_refusals_racing_enable_disable_and_stop(make_proxy, echo_backend, caplog):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('flap', up=0.001, down=0.02, mode='refuse')
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                with socket.create_connection(proxy.address, timeout=1) as sock:
                    sock.sendall(b'x')
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        for thread in threads:
            thread.start()
        try:
            for _ in range(100):
                proxy.disable()
                proxy.enable()
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
    assert 'Traceback' not in caplog.text and 'Error' not in caplog.text
    proxy.set_handler('normal')
    proxy.enable()
    assert round_trip(proxy.address) == b'ping'


def test_an_ini_file_with_a_bom_is_read(tmp_path, echo_backend):
    config = tmp_path / 'bom.ini'
    config.write_bytes(b'\xef\xbb\xbf[vaurien]\ndistant = %s:%d\n' % (
        echo_backend.address[0].encode(), echo_backend.address[1]))
    result = run_cli('--config', str(config), '--list-handlers')
    assert result.returncode == 0, result.stderr


def test_numbers_are_ascii_digits():
    with pytest.raises(vaurien.ConfigError):
        vaurien.parse_address('localhost:\u0663')
    for spec in ('\u0663:delay', '1_0:delay'):
        with pytest.raises(vaurien.ConfigError):
            vaurien.Behavior(spec, vaurien.default_handlers())
    with pytest.raises(vaurien.ConfigError):
        vaurien.Handler('delay', vaurien.delay).validate({'sleep': '\u0663'})


def test_tiny_chunks_held_back_count_against_the_high_water_mark(cli_proxy, echo_backend):
    """A 1-byte chunk costs a queue entry: the reader stops long before a million."""
    proc = cli_proxy('--distant', '%s:%d' % echo_backend.address)
    Client(*proc.control).set_handler('delay', sleep=30)
    before = proc_rss(proc.process.pid)
    with connect(proc.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.send(b'x')
        assert proc_rss(proc.process.pid) - before < 40 << 20


def test_a_timeout_set_again_starts_a_new_clock(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    with connect(proxy.address) as sock:
        with proxy.with_handler('timeout', timeout=0.3):
            sock.sendall(b'swallowed')
            time.sleep(0.1)
        proxy.set_handler('timeout', timeout=0.3)
        sock.sendall(b'swallowed too')    # the clock starts again here
        assert outcome(sock)[0] == 'eof'


@pytest.fixture(scope='module')
def errors_proxy():
    backend = Backend(echo)
    proxy = Proxy(LOOP + ':0', '%s:%d' % backend.address, behavior='100:errors').start()
    yield proxy
    proxy.stop()
    backend.close()


STARTUP = struct.pack('!I', 196608) + b'user\x00u\x00database\x00d\x00\x00'
PROTOCOL_REQUESTS = [
    b'GET /x HTTP/1.1\r\nHost: a\r\n\r\n',
    b'PROPFIND /d HTTP/1.1\r\nHost: a\r\nDepth: 1\r\n\r\n',
    b'PURGE /cache/item HTTP/1.0\r\n\r\n',
    b'*1\r\n$4\r\nPING\r\n',
    b'PING\r\n',
    b'get key\r\n',
    b'set k 0 0 1\r\nx\r\n',
    struct.pack('!I', len(STARTUP) + 4) + STARTUP,
]
_whole_answers = {}


@hsettings(max_examples=60, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.sampled_from(PROTOCOL_REQUESTS), data=st.data())
def test_any_chunking_of_a_request_gets_the_answer_of_the_whole_request(errors_proxy, request,
                                                                         data):
    if request not in _whole_answers:
        _whole_answers[request] = send_in_pieces(errors_proxy.address, [request], pause=0)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(request) - 1), max_size=4)))
    pieces = [request[start:end] for start, end in zip([0] + cuts, cuts + [len(request)])]
    assert send_in_pieces(errors_proxy.address, pieces, pause=0.005) == \
        _whole_answers[request]
    assert _whole_answers[request][0] == 'eof' and _whole_answers[request][1]


# ---------------------------------------------------------------------------
# Regressions found in the review of the pump
# ---------------------------------------------------------------------------

def answer_then_reset_backend():
    def serve(sock):
        sock.recv(100)
        sock.sendall(b'the answer')
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    return Backend(serve)


def test_a_reset_never_overtakes_what_a_blocking_handler_still_holds(make_proxy):
    def slow_relay(source, dest, to_backend, name, settings, proxy):
        time.sleep(0.3)
        dest.sendall(proxy.get_data(source))
    backend = answer_then_reset_backend()
    try:
        handlers = custom_registry(slow_relay=slow_relay)
        proxy = make_proxy(backend.address, handlers=handlers, behavior='100:slow_relay')
        with connect(proxy.address) as sock:
            sock.sendall(b'question')
            assert outcome(sock) == ('rst', b'the answer')
    finally:
        backend.close()


def test_a_reset_after_a_half_close_reaches_the_backend_when_it_writes(make_proxy):
    results = []

    def serve(sock):
        read_all(sock)                       # the request, then EOF
        time.sleep(0.3)                      # the client resets meanwhile
        for _ in range(5):
            try:
                sock.sendall(b'x' * 1000)
            except OSError as exc:
                return results.append(type(exc).__name__)
            time.sleep(0.1)
        results.append('never refused')
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        sock = connect(proxy.address)
        sock.sendall(b'request')
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.close()
        wait_for(lambda: results, what='the backend to write')
        assert results[0] in ('BrokenPipeError', 'ConnectionResetError')
    finally:
        backend.close()


def test_refuse_for_from_any_thread_reopens_on_time(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.refuse_for(0.3)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=WAIT)
    wait_for(lambda: proxy.status()['enabled'], deadline=3, what='the listener to reopen')
    assert round_trip(proxy.address) == b'ping'


def test_start_during_a_refusal_leaves_it_alone(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('flap', up=0.001, down=1.0, mode='refuse')
    time.sleep(0.01)
    with pytest.raises(ConnectionResetError):           # found the outage
        with connect(proxy.address) as sock:
            sock.recv(1)
    proxy.start()
    with pytest.raises(ConnectionRefusedError):          # still refused, as a server down
        socket.create_connection(proxy.address, timeout=WAIT)


def test_a_stopped_proxy_cannot_be_driven_by_a_kept_alive_client(echo_backend):
    proxy = Proxy(LOOP + ':0', '%s:%d' % echo_backend.address, http=True, http_port=0)
    proxy.start()
    client = Client(*proxy.control)
    assert client.status()['enabled']
    proxy.stop()
    with pytest.raises(vaurien.VaurienError):
        client.enable()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=WAIT)


def test_a_backend_name_that_can_never_be_resolved_is_refused_at_once(make_proxy, proxy):
    never = 'a' * 64 + '.example'     # a label over 63 characters: no resolver takes it
    with pytest.raises(vaurien.ConfigError, match='distant: a{64}.example is no host name'):
        make_proxy((never, 80))
    with pytest.raises(vaurien.ConfigError, match='is no host name'):
        proxy.update(distant=(never, 80))
    assert round_trip(proxy.address) == b'ping'


def test_corrupting_every_byte_of_megabytes_holds_nobody_up(make_proxy, echo_backend, caplog):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('corrupt', ratio=1, direction='to_backend')
    payload = bytes(4 << 20)
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        with connect(proxy.address) as sock:
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            got = read_exactly(sock, len(payload), 60)
    assert all(bin(byte).count('1') == 1 for byte in got[:100000])
    assert 'in the pump' not in caplog.text       # no call held the pump 50 ms


# ---------------------------------------------------------------------------
# A new user's suite: units, own handlers, errors that name what is wrong
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('name,key,written,typed', [
    ('delay', 'sleep', '500ms', 0.5), ('delay', 'sleep', '2s', 2.0),
    ('delay', 'sleep', '1.5m', 90.0), ('delay', 'sleep', '250us', 0.00025),
    ('delay', 'sleep', '500', 500.0), ('delay', 'sleep', 0.25, 0.25),
    ('bandwidth', 'rate', '100KB', 100000), ('bandwidth', 'rate', '100kB/s', 100000),
    ('bandwidth', 'rate', '64KiB', 65536), ('bandwidth', 'rate', '1.5MB', 1500000),
    ('bandwidth', 'rate', '2048', 2048), ('limit_data', 'bytes', '1MiB', 1 << 20),
    ('limit_data', 'bytes', '9007199254740993', 9007199254740993),
    ('limit_data', 'bytes', '1.5kB', 1500),
    ('flap', 'up', '100ms', 0.1), ('slicer', 'delay', '10ms', 0.01),
    ('delay', 'direction', 'To_Client', 'to_client'), ('errors', 'protocol', 'HTTP', 'http'),
])
def test_settings_take_units_as_people_write_them(name, key, written, typed):
    handler = vaurien.default_handlers()[name]
    value = handler.validate({key: written})[key]
    assert value == pytest.approx(typed) and type(value) is type(typed)


@pytest.mark.parametrize('name,key,written', [
    ('delay', 'sleep', '5 parsecs'), ('delay', 'sleep', '5ms/s'), ('delay', 'sleep', '-1ms'),
    ('bandwidth', 'rate', '0.5B'), ('bandwidth', 'rate', '1.5'), ('bandwidth', 'rate', '10Kb/m'),
    ('limit_data', 'bytes', '1s'), ('limit_data', 'bytes', '600000.5'),
    ('limit_data', 'bytes', '1.0000001kB'), ('limit_data', 'bytes', '1e-7'),
    ('bandwidth', 'rate', '100Mb/s'), ('limit_data', 'bytes', '1kB/s'),
])
def test_settings_with_a_wrong_unit_are_refused_saying_which_units_go(name, key, written):
    handler = vaurien.default_handlers()[name]
    with pytest.raises(vaurien.ConfigError) as error:
        handler.validate({key: written})
    assert '%s = %r' % (key, written) in str(error.value)
    assert 'with a unit: ' in str(error.value)


def test_units_in_a_config_file_and_through_the_api_reach_the_wire(tmp_path, echo_backend,
                                                                  cli_proxy):
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:%d\nbehavior = 100:delay\n'
                'connect_timeout = 2s\n[handler:delay]\nsleep = 300ms\n' % echo_backend.address)
    proc = cli_proxy('--config', ini)
    started = time.monotonic()
    assert round_trip(proc.address) == b'ping'
    assert 0.3 <= time.monotonic() - started < WAIT     # 300 ms, not 300 s
    client = Client(*proc.control)
    assert client.set_handler('delay', sleep='200ms')['settings']['sleep'] == 0.2
    assert client.set_handler('bandwidth', rate='100kB/s')['settings']['rate'] == 100000


@vaurien.traits(blocking=False)
def shout(source, dest, to_backend, name, settings, proxy):
    """Upper-cases what the backend answers.

    Settings:
      suffix (str, default !): added to each reply chunk.
    """
    data = proxy.get_data(source)
    if data and not to_backend:
        data = data.upper() + settings['suffix'].encode()
    dest.sendall(data)


def test_handlers_given_to_a_proxy_add_to_the_built_in_ones(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, handlers={'shout': shout})
    assert round_trip(proxy.address, b'hey') == b'hey'          # normal is still there
    with proxy.with_handler('shout', suffix='?'):
        assert round_trip(proxy.address, b'hey') == b'HEY?'
    with proxy.with_handler('delay', sleep='10ms'):
        assert round_trip(proxy.address, b'hey') == b'hey'
    assert {'shout', 'normal', 'delay', 'errors'} <= set(proxy.list_handlers())


def test_register_and_set_handler_with_a_function(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address, http=True)
    proxy.register('loud', shout, suffix='!!')
    proxy.set_behavior('100:loud')
    assert round_trip(proxy.address, b'hey') == b'HEY!!'
    proxy.set_behavior('100:normal')
    with proxy.with_handler(shout, suffix='#'):                 # registered as 'shout'
        assert proxy.get_handler()['handler'] == 'shout'
        assert round_trip(proxy.address, b'hey') == b'HEY#'
    assert proxy.get_handler()['handler'] == 'normal'
    assert Client(*proxy.control).set_handler('shout')['handler'] == 'shout'

    def shout2(*args):
        return shout(*args)
    shout2.__name__ = 'shout'
    with pytest.raises(vaurien.ConfigError, match="another handler is registered as 'shout'"):
        proxy.set_handler(shout2)
    with pytest.raises(vaurien.VaurienError, match='cannot be sent a function'):
        Client(*proxy.control).set_handler(shout)


def test_unknown_handler_names_say_the_closest_and_the_known_ones(proxy):
    for call in (proxy.set_handler, Client(*proxy.control).set_handler,
                 lambda name: proxy.set_behavior('20:' + name)):
        with pytest.raises(vaurien.VaurienError) as error:
            call('error')
        assert "unknown handler 'error' (did you mean errors? known: abort," in str(error.value)
    status, answer = api(proxy.control, 'PUT', '/handler', '{"name": "delai"}')
    assert status == 400 and 'did you mean delay?' in answer['error']
    assert 'normal' in answer['known']
    with pytest.raises(vaurien.VaurienError, match="Toxiproxy's latency is delay here"):
        proxy.add_fault('latency')
    with pytest.raises(vaurien.VaurienError, match='did you mean slow_close?'):
        proxy.set_handler('slow close')
    for spec in ('20:delay(sleep=0.2)', '20:delay:sleep=0.2'):
        result = run_cli('--distant', '%s:9' % LOOP, '--behavior', spec)
        assert result.returncode == 2 and "a handler's settings go apart: --set " \
            "NAME.SETTING=VALUE, its [handler:NAME] section of the config file, or the API" \
            in result.stderr


@pytest.mark.parametrize('path,body,named', [
    ('/handler', {'name': 'delay', 'sleep': 2}, "'sleep'"),
    ('/handler', {'name': 'delay', 'settings': {}, 'colour': 1, 'size': 2}, "'colour', 'size'"),
    ('/behavior', {'behavior': '20:delay', 'seed': 3}, "'seed'"),
    ('/proxy', {'enabled': True, 'connections': 3}, "'connections'"),
])
def test_api_bodies_with_unknown_keys_are_refused_naming_them(proxy, path, body, named):
    before = proxy.get_handler()
    status, answer = api(proxy.control, 'PUT', path, json.dumps(body))
    assert status == 400 and 'unknown key' in answer['error'] and named in answer['error']
    assert proxy.get_handler() == before


def test_put_handler_takes_what_get_handler_returns(proxy):
    address = proxy.control
    proxy.set_behavior('20:delay,10:errors')
    saved_mix = api(address, 'GET', '/handler')[1]
    proxy.set_handler('delay', sleep='250ms')
    saved_fixed = api(address, 'GET', '/handler')[1]
    proxy.set_handler('errors', status=500)
    assert api(address, 'PUT', '/handler', json.dumps(saved_fixed)) == (200, saved_fixed)
    assert api(address, 'PUT', '/handler', json.dumps(saved_mix)) == (200, saved_mix)
    assert proxy.get_behavior() == '20:delay,10:errors,70:normal' and not proxy.fixed
    broken = dict(saved_fixed, settings={'sleep': -1})
    assert api(address, 'PUT', '/handler', json.dumps(broken))[0] == 400
    assert api(address, 'GET', '/handler')[1] == saved_mix       # nothing changed


def test_handler_and_mix_changes_are_logged_with_where_they_came_from(proxy, caplog):
    with caplog.at_level(logging.INFO, logger='vaurien'):
        proxy.set_handler('delay', sleep=0.5)
        Client(*proxy.control).set_behavior('20:errors')
        with Client(*proxy.control).with_handler('hang'):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == 'vaurien']
    assert 'handler delay set, by a Python call (sleep=0.5, jitter=0.0, ' \
           'direction=to_backend)' in lines
    assert 'behavior 20:errors,80:normal set, by the control API (127.0.0.1, vaurien ' \
           'Client)' in lines
    assert 'handler hang set, by the control API (127.0.0.1, vaurien Client) (no ' \
           'settings)' in lines
    assert 'behavior 20:errors,80:normal restored, by the control API (127.0.0.1, ' \
           'vaurien Client)' in lines


def test_a_proxy_never_started_accepts_all_the_same(echo_backend):
    proxy = Proxy(LOOP + ':0', '%s:%d' % echo_backend.address)
    try:
        assert round_trip(proxy.address) == b'ping'     # no client left hanging
    finally:
        proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=WAIT)


def test_taken_addresses_are_named_with_what_to_do(echo_backend):
    taken = socket.create_server((LOOP, 0))
    try:
        where = '%s:%d' % taken.getsockname()
        with pytest.raises(OSError, match='cannot listen on %s: .*give port 0' % where):
            Proxy(where, '%s:%d' % echo_backend.address)
        with pytest.raises(OSError, match='cannot listen on %s: .*as http_port=0 or --http-port 0' % where):
            Proxy(LOOP + ':0', '%s:%d' % echo_backend.address, http=True,
                  http_host=LOOP, http_port=taken.getsockname()[1]).start().stop()
    finally:
        taken.close()


@pytest.mark.parametrize('local,distant', [
    ('127.0.0.1:{port}', '127.0.0.1:{port}'), ('0.0.0.0:{port}', 'localhost:{port}'),
    ('0.0.0.0:{port}', '127.0.0.2:{port}'),
])
def test_a_proxy_pointed_at_itself_is_refused(local, distant):
    with socket.socket() as probe:            # a port free a moment ago
        probe.bind((LOOP, 0))
        port = probe.getsockname()[1]
    local, distant = local.format(port=port), distant.format(port=port)
    with pytest.raises(vaurien.ConfigError, match='is this proxy itself'):
        Proxy(local, distant)
    result = run_cli('--local', local, '--distant', distant)
    assert result.returncode == 2 and 'is this proxy itself' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# start_proxy's handle: where it is, its log, and never outliving its parent
# ---------------------------------------------------------------------------

def test_start_proxy_returns_the_pid_that_also_tells_where_and_drives(echo_backend):
    with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                     http_host=LOOP, http_port=0, echo=False) as handle:
        assert isinstance(handle, int) and handle.pid == int(handle) and handle + 0 == handle
        assert str(handle) == str(int(handle)) and '%d' % handle == str(handle)
        os.kill(handle, 0)                                  # a real pid
        assert handle.local[0] == LOOP and handle.local[1] > 0
        assert handle.control[0] == LOOP and handle.control[1] > 0
        assert handle.control[1] != 8080 and handle.local[1] != 8000
        assert round_trip(handle.local) == b'ping'
        with handle.client().with_handler('errors', message='E'):
            with connect(handle.local) as sock:
                sock.sendall(b'x')
                assert outcome(sock) == ('eof', b'E')
        assert 'Vaurien ready: proxy %s:%d' % handle.local in handle.output
        assert 'handler errors set, by the control API' in handle.output
        assert '127.0.0.1:%d' % handle.local[1] in repr(handle)
    assert not handle.running
    assert handle.stop() == 0                               # again: nothing more
    with pytest.raises(ValueError):
        stop_proxy(handle)


def test_client_never_drives_another_proxy_when_its_own_is_gone(echo_backend):
    handle = start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                         http_host=LOOP, http_port=0, echo=False)
    assert Client().status()['local'] == '%s:%d' % handle.local
    stop_proxy(handle)
    with pytest.raises(vaurien.VaurienError, match=r'started last \(pid %d\) was stopped'
                       % handle):
        Client()
    handle = start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                         http_host=LOOP, http_port=0, echo=False)
    try:
        os.kill(handle, signal.SIGKILL)
        handle.child.wait(WAIT)
        with pytest.raises(vaurien.VaurienError, match='exited with status -9'):
            Client()
        with pytest.raises(vaurien.VaurienError, match='pid %d exited with status -9' % handle):
            handle.client()
    finally:
        handle.stop()


def test_the_childs_log_reaches_the_parents_stderr(capfd, dead_port):
    with start_proxy(distant='%s:%d' % (LOOP, dead_port), local=LOOP + ':0',
                     http_host=LOOP, http_port=0) as handle:
        with connect(handle.local) as sock:
            assert outcome(sock)[0] in ('eof', 'rst')
        wait_for(lambda: 'unreachable' in handle.output, what='the log line')
        wait_for(lambda: 'unreachable' in capfd.readouterr().err, what='it on our stderr')


def _gone(pid):
    """Whether process `pid` has exited (a zombie no one reaped counts as gone)."""
    try:
        with open('/proc/%d/status' % pid) as status:
            return '\nState:\tZ' in status.read()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs /proc')
def test_the_child_never_outlives_its_parent_even_killed(tmp_path, echo_backend):
    script = tmp_path / 'parent.py'
    script.write_text(
        'import sys, time\nsys.path.insert(0, %r)\nimport vaurien\n'
        'handle = vaurien.start_proxy(distant=%r, local="127.0.0.1:0", http_host="127.0.0.1", '
        'http_port=0, echo=False)\nprint(int(handle), handle.local[1], flush=True)\n'
        'time.sleep(60)\n' % (HERE, '%s:%d' % echo_backend.address))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child, port = map(int, parent.stdout.readline().split())
        assert round_trip((LOOP, port)) == b'ping'
        parent.kill()                                       # SIGKILL: no cleanup at all
        parent.wait(WAIT)
        wait_for(lambda: _gone(child), what='the child to exit after its parent')
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOP, port), timeout=WAIT)
    finally:
        parent.kill()
        parent.wait(WAIT)
        parent.stdout.close()


# ---------------------------------------------------------------------------
# The pytest plugin
# ---------------------------------------------------------------------------

PLUGIN_USER_TESTS = '''
import socket

def round_trip(address):
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(100)

def test_in_process(vaurien_proxy):
    proxy = vaurien_proxy(%(backend)r)
    assert round_trip(proxy.address) == b"ping"
    proxy.set_handler("delay", sleep="1ms")

def test_in_a_child(vaurien_process):
    handle = vaurien_process(%(backend)r)
    assert round_trip(handle.local) == b"ping"

def test_fails_with_the_logs(vaurien_proxy, vaurien_process):
    proxy = vaurien_proxy(%(backend)r)
    proxy.set_handler("errors", message="no")
    handle = vaurien_process(%(backend)r)
    handle.client().set_handler("hang")
    assert round_trip(proxy.address) == b"ping"
'''


def plugin_project(tmp_path, backend, conftest=None):
    project = tmp_path / 'project'
    project.mkdir()
    shutil.copy(VAURIEN, str(project / 'vaurien.py'))           # vendored
    (project / 'test_mine.py').write_text(
        PLUGIN_USER_TESTS % {'backend': '%s:%d' % backend.address})
    if conftest:
        (project / 'conftest.py').write_text(conftest)
    return project


def check_plugin_run(result):
    output = result.stdout + result.stderr
    assert '1 failed, 2 passed' in output, output
    assert 'vaurien log: in-process proxies' in output
    assert 'handler errors set, by a Python call' in output
    assert re.search(r'vaurien log: proxy pid \d+', output)
    assert 'handler hang set, by the control API (127.0.0.1, vaurien Client)' in output


@pytest.mark.parametrize('how', ['-p vaurien', 'conftest'])
def test_the_pytest_plugin_gives_fixtures_and_logs_on_failure(tmp_path, echo_backend, how):
    project = plugin_project(tmp_path, echo_backend, conftest="pytest_plugins = ['vaurien']\n"
                             if how == 'conftest' else None)
    args = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'] + \
        (['-p', 'vaurien'] if how == '-p vaurien' else [])
    result = subprocess.run(args, cwd=str(project), capture_output=True, text=True,
                            timeout=120)
    check_plugin_run(result)
    ps = subprocess.run(['pgrep', '-f', str(project)], capture_output=True, text=True)
    assert not ps.stdout.strip()                       # no child left running


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """This checkout, installed by pip into a folder of its own: that folder."""
    site, source = tmp_path_factory.mktemp('site'), tmp_path_factory.mktemp('source')
    for name in ('vaurien.py', 'setup.py', 'README.txt', 'LICENSE'):   # built there, not
        shutil.copy(os.path.join(HERE, name), str(source / name))         # in the checkout
    shutil.copytree(os.path.join(HERE, 'handlers'), str(source / 'handlers'),
                    ignore=shutil.ignore_patterns('__pycache__'))
    install = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(site),
         str(source)], capture_output=True, text=True, timeout=300)
    if install.returncode:
        pytest.skip('pip cannot install here: %s' % install.stderr.strip()[-300:])
    return site


def test_the_pytest_plugin_of_an_installed_vaurien_needs_no_flag(tmp_path, echo_backend,
                                                                installed):
    project = plugin_project(tmp_path, echo_backend)
    (project / 'vaurien.py').unlink()                 # only the installed copy
    env = dict(os.environ, PYTHONPATH=str(installed))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'],
                            cwd=str(project), capture_output=True, text=True, timeout=120,
                            env=env)
    check_plugin_run(result)


def test_importing_vaurien_does_not_import_pytest():
    result = subprocess.run([sys.executable, '-c', 'import sys, vaurien; '
                             'print("pytest" in sys.modules, hasattr(vaurien, "vaurien_proxy"))'],
                            cwd=HERE, capture_output=True, text=True, timeout=WAIT)
    assert result.stdout.split() == ['False', 'False']


BUNDLED_INI = """[vaurien]
distant = 127.0.0.1:9
behavior = 100:loading

[handler:loading]
callable = vaurien_handlers.redis.loading
warmup = 2
"""


def check_bundled_handlers(command, cwd, env=None):
    (cwd / 'handlers').mkdir()                        # a user's own package of that name
    (cwd / 'handlers' / '__init__.py').write_text('raise ImportError("the user\'s own")\n')
    (cwd / 'v.ini').write_text(BUNDLED_INI)
    result = subprocess.run(command + ['--config', 'v.ini', '--list-handlers'], cwd=str(cwd),
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert 'loading: ' in result.stdout and 'configured: 2.0' in result.stdout


def test_bundled_handlers_by_one_name_from_a_checkout_elsewhere(tmp_path):
    check_bundled_handlers([sys.executable, VAURIEN], tmp_path)


def test_bundled_handlers_by_one_name_vendored(tmp_path):
    vendor = tmp_path / 'third_party'
    vendor.mkdir()
    shutil.copy(VAURIEN, str(vendor / 'vaurien.py'))
    shutil.copytree(os.path.join(HERE, 'handlers'), str(vendor / 'handlers'))
    work = tmp_path / 'work'
    work.mkdir()
    check_bundled_handlers([sys.executable, str(vendor / 'vaurien.py')], work)


def test_bundled_handlers_by_one_name_installed_without_taking_handlers(tmp_path, installed):
    assert (installed / 'vaurien_handlers' / 'redis.py').exists()
    assert not (installed / 'handlers').exists()
    env = dict(os.environ, PYTHONPATH=str(installed))
    check_bundled_handlers([sys.executable, '-m', 'vaurien'], tmp_path, env=env)


# ---------------------------------------------------------------------------
# README.txt: every code block runs, as written
# ---------------------------------------------------------------------------

README = os.path.join(HERE, 'README.txt')
README_PORTS = re.compile(r'\b(8000|8080|6379|8474)\b')


def readme_blocks():
    """README.txt's code blocks: the runs of lines indented by four spaces that
    follow a blank line, dedented (blank lines inside a block belong to it)."""
    with open(README, encoding='utf-8') as readme:
        lines = readme.read().split('\n')
    lines = [line if line.strip() else '' for line in lines]
    blocks, i = [], 1
    while i < len(lines):
        if lines[i].startswith('    ') and lines[i][4:5] != ' ' and not lines[i - 1]:
            j = i
            while j < len(lines) and (lines[j].startswith('    ') or not lines[j] and any(
                    line.startswith('    ') for line in lines[j:j + 3] if line)):
                j += 1
            blocks.append('\n'.join(line[4:] for line in lines[i:j]).strip('\n'))
            i = j
        i += 1
    return blocks


def free_port():
    with socket.socket() as probe:
        probe.bind((LOOP, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope='module')
def readme_redis(tmp_path_factory):
    """A real redis-server on a free port, for the README's examples: its port."""
    server = shutil.which('redis-server')
    pytest.importorskip('redis')
    if not server:
        pytest.skip('redis-server is not installed (apt-get install redis-server)')
    port = free_port()
    process = subprocess.Popen([server, '--port', str(port), '--bind', LOOP, '--save', '',
                                '--appendonly', 'no', '--dir', str(tmp_path_factory.mktemp('r'))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts((LOOP, port)), what='redis-server')
        yield port
    finally:
        process.kill()
        process.wait(WAIT)


@pytest.fixture
def as_written(tmp_path, request):
    """Run README blocks as written: a `vaurien` command on the PATH (as installed),
    vaurien importable, the ports mapped to free ones (6379 to the Redis)."""
    class Runner:
        ports = {'8000': str(free_port()), '8080': str(free_port()), '8474': str(free_port())}
        bin = tmp_path / 'bin'
        env = dict(os.environ, PYTHONPATH=HERE,
                   PATH='%s%s%s' % (tmp_path / 'bin', os.pathsep, os.environ['PATH']))

        def map(self, text):
            if '6379' in text:
                self.ports['6379'] = str(request.getfixturevalue('readme_redis'))
            return README_PORTS.sub(lambda match: self.ports[match.group(1)], text)

        def unmap(self, text):
            back = {port: name for name, port in self.ports.items()}
            return re.sub(r'\b(%s)\b' % '|'.join(back), lambda m: back[m.group(1)], text)

        def command(self, line):
            """A shell line's argv: python3 is this interpreter."""
            argv = self.map(line).split('#')[0].split()
            return [sys.executable] + argv[1:] if argv[0] == 'python3' else argv

    runner = Runner()
    runner.bin.mkdir()
    shim = runner.bin / 'vaurien'
    shim.write_text('#!/bin/sh\nexec %s %s "$@"\n' % (sys.executable, VAURIEN))
    shim.chmod(0o755)
    return runner


def started(argv, env, cwd=HERE):
    """A command that prints the ready line: (Popen, its ready line, the lines after)."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=str(cwd))
    for line in process.stderr:
        if line.startswith('Vaurien ready: '):
            rest = []
            threading.Thread(target=rest.extend, args=(process.stderr,), daemon=True).start()
            return process, line.strip(), rest
    process.wait(WAIT)
    raise AssertionError('%s: no ready line (status %s)' % (argv, process.returncode))


@contextlib.contextmanager
def running(argv, env, cwd=HERE):
    process, ready, rest = started(argv, env, cwd)
    try:
        yield ready, rest
    finally:
        process.kill()
        process.wait(WAIT)
        process.stderr.close()


def redis_ping(port):
    import redis
    return redis.Redis(LOOP, int(port), socket_timeout=5).ping()


def run_readme_command_line(block, runner):
    """vaurien --local localhost:8000 --distant localhost:6379 ...: its ready line is
    README's, and Redis answers through it."""
    with running(runner.command(block), runner.env) as (ready, _):
        assert redis_ping(runner.ports['8000'])
    samples = [b for b in readme_blocks() if b.startswith('Vaurien ready: ')]
    assert runner.unmap(ready) == samples[0]


def run_readme_ready_line(block, runner):
    assert vaurien._READY.search(block)
    command = [b for b in readme_blocks() if b.startswith('vaurien --local')][0]
    run_readme_command_line(command, runner)


def run_readme_demo(block, runner):
    """The demo, then the curl lines it prints, as printed."""
    with running(runner.command(block), runner.env) as (ready, rest):
        wait_for(lambda: 'Ctrl-C stops.' in ''.join(rest), what="the demo's how-to")
        howto = [line.strip() for line in ''.join(rest).splitlines()
                 if line.startswith('    curl ')]
        assert len(howto) == 3, howto
        if not shutil.which('curl'):
            pytest.skip('curl is not installed')

        def curl(line):
            return subprocess.run(line.split() + ['-m', '10'], capture_output=True, text=True,
                                  timeout=30).stdout
        statuses = set()
        for _ in range(200):     # each draw is a 503 with 30%: 20 in a row fail 1 run in 1,250
            statuses.add(curl(howto[0]).split(' ')[1])
            if {'200', '503'} <= statuses:
                break
        assert {'200', '503'} <= statuses
        wait_for(lambda: 'opened: errors' in ''.join(rest), what='the handler each met')
        curl(howto[1])                                   # every request fails
        assert curl(howto[0]).startswith('HTTP/1.1 503')
        curl(howto[2])                                   # and back to the mix
        control = vaurien.parse_address(re.search(r'control http://(\S+);', ready).group(1))
        assert Client(*control).get_handler() == {
            'handler': None, 'settings': {}, 'fixed': False,
            'behavior': '30:delay,30:errors,40:normal'}


def run_readme_config(block, runner, tmp_path):
    ini = tmp_path / 'vaurien.ini'
    ini.write_text(runner.map(block))
    listing = subprocess.run(['vaurien', '--config', str(ini), '--list-handlers'],
                             capture_output=True, text=True, env=runner.env, timeout=60)
    assert listing.returncode == 0 and 'configured: 2.0' in listing.stdout
    with running(['vaurien', '--config', str(ini)], runner.env):
        assert redis_ping(runner.ports['8000'])


def run_readme_custom_handler(block, runner, tmp_path, ini=None):
    """The shout handler is examples/custom_handler.py's; with the README's ini, it
    upper-cases an HTTP backend's body and leaves its head alone."""
    with open(os.path.join(HERE, 'examples', 'custom_handler.py')) as example:
        assert block in example.read()
    ini = ini or [b for b in readme_blocks() if 'callable = custom_handler.shout' in b][0]
    (tmp_path / 'custom_handler.py').write_text(block + '\n')
    backend = vaurien.DemoBackend()            # 8080: an HTTP backend on a free port
    runner.ports['8080'] = str(backend.server_address[1])
    runner.ports['8000'] = str(free_port())    # drawn after it: not the port it took
    (tmp_path / 'custom.ini').write_text(runner.map(ini))
    try:
        with running(['vaurien', '--config', str(tmp_path / 'custom.ini')], runner.env):
            conn = http.client.HTTPConnection(LOOP, int(runner.ports['8000']), timeout=WAIT)
            conn.request('GET', '/quiet')
            response = conn.getresponse()
            assert response.read() == b'HELLO FROM THE VAURIEN DEMO BACKEND: REQUEST #1, ' \
                b'/QUIET\n'
            assert response.getheader('Content-Type') == 'text/plain; charset=utf-8'  # kept
            conn.close()
    finally:
        backend.shutdown()
        backend.server_close()


def run_readme_python(block, runner, tmp_path):
    """A snippet of the Python API, executed in a child: everything it starts ends."""
    script = tmp_path / 'snippet.py'
    script.write_text(runner.map(block) + '\n')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=runner.env, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr


def run_readme_pytest(block, runner, tmp_path):
    """A test file of the README, run by pytest as a user would."""
    (tmp_path / 'test_cache.py').write_text(runner.map(block) + '\n')
    command = [b for b in readme_blocks() if b.startswith('python3 -m pytest -p vaurien')][0]
    argv = runner.command(command) if 'vaurien_proxy' in block else \
        [sys.executable, '-m', 'pytest', 'test_cache.py']
    result = subprocess.run(argv + ['-q', '-p', 'no:cacheprovider'], capture_output=True,
                            text=True, env=runner.env, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0 and '1 passed' in result.stdout, result.stdout


def run_readme_plugin_command(block, runner, tmp_path):
    test_file = [b for b in readme_blocks() if 'def test_the_cache_is_down' in b][0]
    run_readme_pytest(test_file, runner, tmp_path)


def run_readme_test_command(block, runner):
    with open(os.path.join(HERE, '.ci', 'run')) as ci:
        assert ci.read().strip().splitlines()[-1] == block     # CI runs it, every time


def run_readme_examples(block, runner):
    """The three questions' tests: README's test command runs them, in CI too."""
    command = [b for b in readme_blocks() if b.startswith('python3 -m venv .venv && ')][0]
    files = block.split()[4:]
    assert files and all(name.startswith('examples/test_') for name in files)
    assert all(' %s' % name in command for name in files)
    run_readme_test_command(command, runner)


def run_readme_bench(block, runner):
    """The benchmark, a smoke test so that it never rots: one table, no problem seen."""
    result = subprocess.run(runner.command(block), capture_output=True, text=True,
                            timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '| bulk upload' in result.stdout and 'handler switch' in result.stdout
    problems = result.stdout.partition('Problems seen:')[2]
    for sign in ('logged', 'did not exit', 'exited with status', 'Error', 'did not echo'):
        assert sign not in problems, problems   # a slow exit on a loaded machine is no failure


def test_bench_rounds_turn_the_relays_and_report_the_median_with_the_spread():
    """--rounds: each round starts one relay later; a ratio is the median of the rounds'.
    Below the ratios, each relay's own CPU per unit of work."""
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, 'bench', 'bench.py'), '--quick', '--rounds', '3',
         '--only', 'roundtrip'], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'quick run, 3 rounds' in result.stdout
    row = re.search(r'^\| echo 64 B round trips, 1 conn .*$', result.stdout, re.M)[0]
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    relays = re.search(r'relays: ([^;\n]+)', result.stdout)[1].split(', ')
    label = 'echo 64 B round trips, 1 conn, '
    measured = {(kind, int(number)): float(value.replace(',', '')) for kind, number, value in
                re.findall(re.escape(label) + r'(\w+), round (\d): ([\d,]+) rt/s', result.stderr)}
    for kind, text in zip(relays, cells[2:]):
        ratios = [measured[kind, number] / measured['direct', number] for number in (1, 2, 3)]
        shown = map(float, re.fullmatch(r'(\S+) \((\S+)-(\S+)\)', text).groups())
        for value, expected in zip(shown, (statistics.median(ratios), min(ratios), max(ratios))):
            assert abs(value - expected) < 0.0051     # rounded twice: the rates, the ratios
    order = [re.search(re.escape(label) + r'(\w+), round %d:' % number, result.stderr)[1]
             for number in (1, 2, 3)]
    assert order == ['direct'] + relays[:2]     # each round starts one relay later
    cpu = re.search(r'^\| echo 64 B round trips, 1 conn +\| +us/rt \|(.*)\|$', result.stdout,
                    re.M)[1].split('|')
    cells = dict(zip(relays, (text.strip() for text in cpu)))
    assert float(cells['vaurien']) > 0 and float(cells['minimal']) > 0     # from /proc
    assert cells.get('socat', '-') == '-'     # a process per connection: not counted


def readme_runner(block):
    """The function that runs `block`, chosen by what it is."""
    first = block.split('\n')[0]
    if first == 'python3 vaurien.py --demo':
        return run_readme_demo
    if first.startswith('python3 -m venv .venv && '):
        return run_readme_test_command
    if first.startswith('python3 bench/bench.py'):
        return run_readme_bench
    if first.startswith('python3 -m pytest -p vaurien'):
        return run_readme_plugin_command
    if first.startswith('python3 -m pytest -q examples/'):
        return run_readme_examples
    if first.startswith('vaurien --local'):
        return run_readme_command_line
    if first.startswith('vaurien toxiproxy'):
        return run_readme_toxiproxy
    if first.startswith('from toxiproxy import'):
        return run_readme_toxiproxy_client
    if first.startswith('Vaurien ready: '):
        return run_readme_ready_line
    if first == '[vaurien]':
        return run_readme_custom_handler_ini if 'custom_handler.shout' in block \
            else run_readme_config
    if first == 'from vaurien import traits':
        return run_readme_custom_handler
    if 'def test_' in block:
        return run_readme_pytest
    if first.startswith(('from vaurien import', 'with start_proxy(')):
        return run_readme_python
    raise AssertionError('README.txt has a code block no test runs: %r' % first)


def run_readme_toxiproxy(block, runner):
    """vaurien toxiproxy: it is ready at once, and answers as Toxiproxy 2.12."""
    with running(runner.command(block), runner.env) as (ready, _):
        address = vaurien.parse_address(ready.split('http://')[1])
        assert address[1] == int(runner.ports['8474'])
        conn = http.client.HTTPConnection(*address, timeout=WAIT)
        conn.request('GET', '/version')
        assert conn.getresponse().read() == b'{"version": "2.12.0"}\n'
        conn.close()


def run_readme_toxiproxy_client(block, runner, tmp_path):
    """The toxiproxy-python snippet, against the vaurien toxiproxy of the block before."""
    pytest.importorskip('toxiproxy', reason='pip install toxiproxy-python')
    command = [b for b in readme_blocks() if b.startswith('vaurien toxiproxy')][0]
    script = tmp_path / 'snippet.py'
    script.write_text(runner.map(block) + '\n')
    with running(runner.command(command), runner.env):
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                env=runner.env, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r'127\.0\.0\.1:\d+\n', result.stdout), result.stdout


def run_readme_custom_handler_ini(block, runner, tmp_path):
    handler = [b for b in readme_blocks() if b.startswith('from vaurien import traits')][0]
    run_readme_custom_handler(handler, runner, tmp_path, ini=block)


@pytest.mark.parametrize('block', readme_blocks(),
                         ids=lambda block: block.split('\n')[-1 if 'def test_' in block
                                                             else 0][:40])
def test_every_readme_code_block_runs_as_written(block, as_written, tmp_path):
    run = readme_runner(block)
    arguments = inspect.signature(run).parameters
    run(block, as_written, *([tmp_path] if 'tmp_path' in arguments else []))


# ---------------------------------------------------------------------------
# What a new user's first hour ran into
# ---------------------------------------------------------------------------

def test_connection_lines_tell_the_handler_met_and_the_bytes_delivered(make_proxy,
                                                                      echo_backend, caplog):
    proxy = make_proxy(echo_backend.address, behavior='100:delay')
    proxy.set_handler('errors', message='no')
    with caplog.at_level(logging.DEBUG, logger='vaurien'):
        with connect(proxy.address) as sock:
            sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            answer = outcome(sock)[1]
        wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    lines = [r.getMessage() for r in caplog.records if r.name == 'vaurien']
    assert any(line.endswith('opened: errors') for line in lines)
    closed = [line for line in lines if ' closed: ' in line][0]
    assert 'closed: errors, 0 B to the backend, %d B to the client' % len(answer) in closed
    assert echo_backend.accepted == 0


def test_transient_takes_the_error_settings_it_answers_with(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('transient', count=1, status=502, message='restarting')
    conn = http.client.HTTPConnection(*proxy.address, timeout=WAIT)
    conn.request('GET', '/')
    response = conn.getresponse()
    assert (response.status, response.read()) == (502, b'restarting\n')
    conn.close()
    assert round_trip(proxy.address) == b'ping'                  # the second passes
    with pytest.raises(vaurien.ConfigError, match='MySQL error number'):
        proxy.set_handler('transient', protocol='mysql', code='HY000')


@pytest.mark.parametrize('args,message', [
    (('127.0.0.1:0',), "missing 1 required positional argument: 'distant'"),
    (('127.0.0.1:0', 6379), 'distant = 6379: expected HOST:PORT'),
    (('127.0.0.1:0', ('localhost',)), "distant = ('localhost',): expected HOST:PORT"),
    (('127.0.0.1:0', '127.0.0.1:0'), "port 0 is no backend's port"),
])
def test_a_proxy_made_wrong_says_how(args, message):
    with pytest.raises((TypeError, vaurien.ConfigError), match=re.escape(message)):
        Proxy(*args)


def test_in_process_and_child_proxies_tell_their_control_api_alike(echo_backend):
    with Proxy(LOOP + ':0', echo_backend.address, http=True, http_host=LOOP,
               http_port=0) as proxy:
        host, port = proxy.control
        assert host == LOOP and proxy.client().status()['enabled']
    assert proxy.control is None
    with pytest.raises(vaurien.VaurienError, match='serves no control API'):
        Proxy(LOOP + ':0', echo_backend.address).client()


def test_a_stopped_handle_says_it_was_stopped(echo_backend):
    handle = start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                         http_host=LOOP, http_port=0, echo=False)
    handle.stop()
    with pytest.raises(vaurien.VaurienError, match='pid %d was stopped' % handle):
        handle.client()
    with pytest.raises(ValueError, match='has pid %d, or it was stopped already$' % handle):
        stop_proxy(handle)


def test_the_fixtures_take_keywords_after_distant(tmp_path, echo_backend):
    project = tmp_path / 'p'
    project.mkdir()
    (project / 'test_x.py').write_text(
        'import pytest\n'
        'def test_proxy(vaurien_proxy):\n'
        '    with pytest.raises(TypeError):\n'
        '        vaurien_proxy("127.0.0.1:0", %(b)r)\n'
        '    assert vaurien_proxy(%(b)r, local="127.0.0.1:0").address[1] > 0\n'
        'def test_process(vaurien_process):\n'
        '    with pytest.raises(TypeError):\n'
        '        vaurien_process("127.0.0.1:0", %(b)r)\n' % {'b': '%s:%d' % echo_backend.address})
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'vaurien', '-p',
                             'no:cacheprovider'], cwd=str(project), capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=HERE))
    assert '2 passed' in result.stdout, result.stdout + result.stderr


def test_control_api_options_without_the_api_are_an_error(tmp_path):
    for args in (['--http-port', '0'], ['--http-host', LOOP], ['--http-token', 'x']):
        result = run_cli('--local', LOOP + ':0', '--distant', 'a:1', *args)
        assert result.returncode == 2 and 'the control API is off: add --http' in result.stderr
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = a:1\nhttp_port = 0\n')
    result = run_cli('--config', ini, '--local', LOOP + ':0')
    assert result.returncode == 2 and '--http-port set, but' in result.stderr


def test_a_minute_or_more_without_a_unit_is_called_out(caplog):
    handler = vaurien.default_handlers()['delay']
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        handler.validate({'sleep': 500})
        handler.validate({'sleep': '90s'})
        handler.validate({'sleep': 5})
    assert [r.getMessage() for r in caplog.records if r.name == 'vaurien'] == [
        "handler delay: sleep = 500 is 500 seconds; for milliseconds, write 500ms (in "
        "Python, the string '500ms')"]


def test_handler_settings_on_the_command_line_override_the_config_files(tmp_path,
                                                                        echo_backend, cli_proxy):
    (tmp_path / 'mychaos.py').write_text(
        'def upper(source, dest, to_backend, name, settings, proxy):\n'
        '    dest.sendall(proxy.get_data(source).upper() + settings["suffix"].encode())\n')
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:%d\n[handler:delay]\nsleep = 2s\n'
                % echo_backend.address)
    proc = cli_proxy('--config', ini, '--set', 'delay.sleep=300ms', '--set',
                     'delay.direction=both', '--set', 'shout.callable=mychaos.upper',
                     '--set', 'shout.suffix=!', '--behavior', '100:shout', cwd=str(tmp_path))
    details = api(proc.control, 'GET', '/handlers')[1]['details']
    assert details['delay']['settings']['sleep']['value'] == 0.3
    assert details['delay']['settings']['direction']['value'] == 'both'
    with connect(proc.address) as sock:
        sock.sendall(b'hey')
        assert read_exactly(sock, 4) == b'HEY!'
    ini = write(tmp_path, 'w.ini', '[proxy:other]\ndistant = %s:%d\nbehavior = 100:loud\n'
                '[vaurien]\ndistant = %s:%d\nbehavior = 100:shout\n'
                '[handler:loud]\ncallable = mychaos.upper\nsuffix = ?\n'
                % (echo_backend.address * 2))   # loud used before its section, shout by --set
    proc = cli_proxy('--config', ini, '--set', 'shout.callable=mychaos.upper',
                     '--set', 'shout.suffix=!', cwd=str(tmp_path))
    other = vaurien.parse_address(api(proc.control, 'GET', '/proxies')[1]['other']['local'])
    for address, answer in ((proc.address, b'HEY!'), (other, b'HEY?')):
        with connect(address) as sock:
            sock.sendall(b'hey')
            assert read_exactly(sock, 4) == answer
    for flag, message in (('delay', '--set delay: expected HANDLER.SETTING=VALUE'),
                          ('delay.sleep=soon', "--set delay sleep = soon: handler delay: "
                                               "setting sleep = 'soon': expected seconds"),
                          ('delay.slep=1', "--set delay slep = 1: unknown setting 'slep'"),
                          ('dela.sleep=1', "--set dela: unknown handler 'dela' (did you mean "
                                           "delay?"),
                          ('mine.x=1', 'give --set mine.callable=package.module.function')):
        result = run_cli('--distant', '%s:9' % LOOP, '--set', flag)
        assert result.returncode == 2 and result.stderr.count('\n') == 1
        assert result.stderr.startswith('vaurien: error: --set') and message in result.stderr


def test_a_log_level_in_capitals_is_taken(cli_proxy):
    proc = cli_proxy('--distant', '%s:9' % LOOP, '--log-level', 'DEBUG')
    with connect(proc.address) as sock:
        outcome(sock)
    wait_for(lambda: 'DEBUG' in ''.join(proc.rest), what='a debug line')


def test_a_minute_without_a_unit_in_an_ini_file_is_called_out_once(tmp_path, cli_proxy):
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:9\nbehavior = 20:delay\n'
                '[handler:delay]\nsleep = 500\n' % LOOP)
    proc = cli_proxy('--config', ini)
    warnings = [line for line in proc.lines if 'for milliseconds' in line]
    assert len(warnings) == 1 and 'sleep = 500 is 500 seconds' in warnings[0]


def test_a_vendored_copy_without_handlers_says_what_to_copy(tmp_path):
    shutil.copy(VAURIEN, str(tmp_path / 'vaurien.py'))
    (tmp_path / 'v.ini').write_text(BUNDLED_INI)
    result = subprocess.run([sys.executable, 'vaurien.py', '--config', 'v.ini'],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'copy it beside vaurien.py' in result.stderr


# ---------------------------------------------------------------------------
# What a review of the above found
# ---------------------------------------------------------------------------

def test_start_proxy_leaves_no_descriptor_behind(echo_backend):
    def descriptors():
        return len(os.listdir('/proc/self/fd'))
    with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                     http_host=LOOP, http_port=0, echo=False):
        pass                                                 # warm up
    before = descriptors()
    for _ in range(15):
        with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                         http_host=LOOP, http_port=0, echo=False) as handle:
            pass
        handle.child.wait(WAIT)
    wait_for(lambda: descriptors() <= before + 1, what='the pipes to be closed')


def test_a_proxy_whose_start_fails_leaves_nothing_relaying(echo_backend):
    taken = socket.create_server((LOOP, 0))
    try:
        proxy = Proxy(LOOP + ':0', echo_backend.address, http=True, http_host=LOOP,
                      http_port=taken.getsockname()[1])
        with pytest.raises(OSError, match='cannot listen'):
            with proxy:
                pass
    finally:
        taken.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=WAIT)


def test_put_handler_with_fixed_false_takes_only_what_get_gave(proxy):
    address = proxy.control
    saved = api(address, 'GET', '/handler')[1]
    assert api(address, 'PUT', '/handler', json.dumps(saved))[0] == 200
    for body in (dict(saved, handler='delay'), dict(saved, settings={'sleep': 2}),
                 {'name': 'delay', 'fixed': False}):
        status, answer = api(address, 'PUT', '/handler', json.dumps(body))
        assert status == 400 and 'give "fixed": true' in answer['error']


def test_restoring_a_long_time_is_no_warning_and_register_copies(make_proxy, echo_backend,
                                                                 caplog):
    proxy = make_proxy(echo_backend.address)
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        with proxy.with_handler('delay', sleep='2m'):
            pass
    assert 'seconds; for milliseconds' not in caplog.text
    proxy.register('slow', proxy.handler('delay'), sleep=3)
    assert proxy.handler('delay').settings['sleep'] == 1.0       # the original is untouched
    assert proxy.set_handler('slow')['handler'] == 'slow'
    for name, function in ((5, shout), ('x', 'not callable')):
        with pytest.raises(vaurien.ConfigError):
            proxy.register(name, function)
    with pytest.raises(vaurien.ConfigError, match=r'handlers= takes \{name: function\}'):
        Proxy(LOOP + ':0', echo_backend.address, handlers=[shout])


def test_the_plugin_works_whatever_was_imported_first(tmp_path, echo_backend):
    (tmp_path / 'test_y.py').write_text(
        'def test_it(vaurien_proxy):\n'
        '    assert vaurien_proxy(%r).address[1] > 0\n' % ('%s:%d' % echo_backend.address))
    script = ('import sys, vaurien, pytest\n'
              'sys.exit(pytest.main(["-q", "-p", "vaurien", "-p", "no:cacheprovider", '
              '"test_y.py"]))\n')
    result = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_vaurien_process_without_a_control_api(tmp_path, echo_backend):
    (tmp_path / 'test_z.py').write_text(
        'import socket\n'
        'def test_it(vaurien_process):\n'
        '    handle = vaurien_process(%r, http=False)\n'
        '    assert handle.control is None\n'
        '    socket.create_connection(handle.local, timeout=10).close()\n'
        % ('%s:%d' % echo_backend.address))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'vaurien', '-p',
                             'no:cacheprovider', 'test_z.py'], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=HERE))
    assert '1 passed' in result.stdout, result.stdout + result.stderr


def test_exit_on_eof_refuses_a_terminal_and_announces_before_it_stops(echo_backend):
    import pty
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([sys.executable, VAURIEN, '--exit-on-eof', '--local',
                                 LOOP + ':0', '--distant', '%s:%d' % echo_backend.address],
                                stdin=follower, capture_output=True, text=True, timeout=30)
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 2 and 'give it a pipe' in result.stderr
    result = subprocess.run([sys.executable, VAURIEN, '--exit-on-eof', '--local', LOOP + ':0',
                             '--distant', '%s:%d' % echo_backend.address],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    assert result.stderr.index('Vaurien ready') < result.stderr.index('standard input closed')


def test_the_self_check_tells_address_families_apart(echo_backend):
    port = free_port()
    with pytest.raises(vaurien.ConfigError, match='is this proxy itself'):
        Proxy('127.0.0.1:%d' % port, '[::ffff:127.0.0.1]:%d' % port)
    if not socket.has_ipv6 or not vaurien._is_local(socket.AF_INET6, '::1'):
        return
    Proxy('0.0.0.0:%d' % port, '[::1]:%d' % port).stop()     # IPv4 only: not itself


# ---------------------------------------------------------------------------
# Named proxies: many in one process, each driven by name
# ---------------------------------------------------------------------------

def test_named_proxies_through_the_api(proxy, echo_backend):
    address = proxy.control
    other = Backend(chunk_server(lambda data: data.upper()))
    try:
        status, made = api(address, 'POST', '/proxies', json.dumps(
            {'name': 'up', 'distant': '%s:%d' % other.address, 'behavior': '100:normal'}))
        assert status == 201 and made['name'] == 'up' and made['local'].startswith(LOOP)
        local = vaurien.parse_address(made['local'])
        assert round_trip(local, b'hey') == b'HEY'
        assert round_trip(proxy.address, b'hey') == b'hey'          # the default one
        assert sorted(api(address, 'GET', '/proxies')[1]) == ['default', 'up']
        api(address, 'PUT', '/proxies/up/handler', '{"name": "errors", "settings": '
            '{"protocol": "raw", "message": "E"}}')
        assert round_trip(local, b'hey') == b'E'
        assert api(address, 'GET', '/handler')[1]['handler'] == 'normal'   # not the default's
        assert api(address, 'PUT', '/proxies/up/behavior', '100:normal')[0] == 200
        moved = api(address, 'PATCH', '/proxies/up', json.dumps(
            {'local': '%s:0' % LOOP, 'distant': '%s:%d' % echo_backend.address}))[1]
        assert round_trip(vaurien.parse_address(moved['local']), b'hey') == b'hey'
        if moved['local'] != made['local']:     # bind(0) may give the port just freed back
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(local, timeout=WAIT)
        assert api(address, 'PUT', '/proxies/up', '{"enabled": false}')[1]['enabled'] is False
        assert api(address, 'PUT', '/proxies/up', '{"enabled": 1}')[1]['enabled'] is True
        assert api(address, 'PUT', '/proxies/up', '{"enabled": 0}')[1]['enabled'] is False
        status, gone = api(address, 'DELETE', '/proxies/up')
        assert status == 200 and gone['deleted'] and gone['local'] == moved['local']
        assert sorted(api(address, 'GET', '/proxies')[1]) == ['default']
    finally:
        other.close()


@pytest.mark.parametrize('method,path,body,status,message', [
    ('POST', '/proxies', '{"name": "x"}', 400, 'give a name and the backend'),
    ('POST', '/proxies', '{"name": ["x"], "distant": "a:1"}', 400, 'give a name'),
    ('GET', '/proxies/default/events', None, 404, 'no such resource'),
    ('DELETE', '/proxy', None, 409, 'goes with its control API'),
    ('POST', '/proxies', '{"name": "x", "distant": "a:1", "colour": 1}', 400, "'colour'"),
    ('POST', '/proxies', '{"name": "x/y", "distant": "a:1"}', 400, 'without "/"'),
    ('POST', '/proxies', '{"name": "x\\ud800", "distant": "a:1"}', 400, 'lone surrogate'),
    ('POST', '/proxies', '{"name": "a\\nb", "distant": "a:1"}', 400, 'a control character'),
    ('PUT', '/handler', '{"name": "errors", "settings": {"message": "\\ud800"}}', 400,
     'message'),
    ('POST', '/proxies', '{"name": "default", "distant": "a:1"}', 409, 'exists already'),
    ('GET', '/proxies/nope', None, 404, "no proxy named 'nope'"),
    ('GET', '/proxies/nope/handler', None, 404, "no proxy named 'nope'"),
    ('DELETE', '/proxies/default', None, 409, 'goes with its control API'),
    ('PUT', '/proxies/default', '{"local": "x:99999"}', 400, "local 'x:99999' is not HOST:PORT"),
    ('PUT', '/proxies/default', '{"enabled": 3}', 400, 'give {"enabled": true}'),
    ('GET', '/proxies/default/nothing', None, 404, 'no such resource'),
])
def test_named_proxy_mistakes_are_named(proxy, method, path, body, status, message):
    answer = api(proxy.control, method, path, body)
    assert answer[0] == status and message in answer[1]['error'], answer
    assert round_trip(proxy.address) == b'ping'


def test_a_taken_address_for_a_named_proxy_is_a_409(proxy, echo_backend):
    taken = socket.create_server((LOOP, 0))
    try:
        where = '%s:%d' % taken.getsockname()
        status, answer = api(proxy.control, 'POST', '/proxies', json.dumps(
            {'name': 'x', 'local': where, 'distant': '%s:%d' % echo_backend.address}))
        assert status == 409 and 'cannot listen on %s' % where in answer['error']
        status, answer = api(proxy.control, 'PUT', '/proxies/default',
                             json.dumps({'local': where}))
        assert status == 409 and round_trip(proxy.address) == b'ping'   # still there
    finally:
        taken.close()


def test_the_client_drives_named_proxies(proxy, echo_backend):
    client = proxy.client()
    named = client.create_proxy('second', '%s:%d' % echo_backend.address, seed=3)
    assert set(client.proxies()) == {'default', 'second'}
    with named.with_handler('errors', protocol='raw', message='no'):
        local = vaurien.parse_address(named.status()['local'])
        assert round_trip(local) == b'no'
        assert round_trip(proxy.address) == b'ping'
    assert round_trip(local) == b'ping'
    with named.down():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(local, timeout=WAIT)
    assert named.delete()['deleted'] and set(client.proxies()) == {'default'}
    with pytest.raises(vaurien.VaurienError, match="404 no proxy named 'second'"):
        named.status()


def test_named_proxies_from_flags_and_a_config_file(tmp_path, echo_backend, cli_proxy):
    upper = Backend(chunk_server(lambda data: data.upper()))
    try:
        ini = write(tmp_path, 'v.ini', '[proxy:cache]\ndistant = %s:%d\nbehavior = 100:delay\n'
                    '[handler:delay]\nsleep = 10ms\n' % upper.address)
        proc = cli_proxy('--config', ini, '--proxy', 'db=%s:0,%s:%d' % (
            LOOP, echo_backend.address[0], echo_backend.address[1]), local=None)
        names = re.findall(r'Vaurien proxy (\w+): (\S+) -> ', ''.join(proc.lines))
        assert sorted(name for name, _ in names) == ['cache', 'db']
        where = {name: vaurien.parse_address(local) for name, local in names}
        assert round_trip(where['cache'], b'hey') == b'HEY'
        assert round_trip(where['db'], b'hey') == b'hey'
        client = Client(*proc.control)
        assert set(client.proxies()) == {'cache', 'db'}
        assert client.proxy('cache').get_behavior() == '100:delay'
        assert client.proxy('db').get_behavior() == '100:normal'
        assert client.get_behavior() == '100:delay'      # no [vaurien]: the first named
    finally:
        upper.close()


@pytest.mark.parametrize('text,message', [
    ('[proxy:x]\nlocal = 127.0.0.1:0\n', 'no distant'),
    ('[proxy:x]\ndistant = a:1\ncolour = 2\n', "unknown key 'colour'"),
    ('[proxy:x]\ndistant = a:1\nbehavior = 20:nope\n', "unknown handler 'nope'"),
    ('[proxy:x]\ndistant = nowhere\n', 'distant = nowhere: expected HOST:PORT'),
    ('[proxy:]\ndistant = a:1\n', 'unknown section'),
])
def test_named_proxy_config_mistakes_are_one_line(tmp_path, text, message):
    ini = write(tmp_path, 'bad.ini', text)
    result = run_cli('--config', ini)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_start_proxy_takes_named_proxies(echo_backend):
    with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                     http_host=LOOP, http_port=0, echo=False,
                     proxy=['a=%s:0,%s:%d' % ((LOOP,) + echo_backend.address)]) as handle:
        named = handle.client().proxy('a')
        assert round_trip(vaurien.parse_address(named.status()['local'])) == b'ping'


# ---------------------------------------------------------------------------
# What happened, visible: stats, events, live connections, Prometheus metrics
# ---------------------------------------------------------------------------

def test_stats_events_and_connections_tell_what_happened(proxy):
    address = proxy.control
    last = api(address, 'GET', '/events?since=0')[1]['last']
    assert round_trip(proxy.address, b'hello') == b'hello'
    wait_for(lambda: proxy.connection_count == 0, what='the first to end')
    proxy.set_handler('errors', protocol='raw', message='E')
    assert round_trip(proxy.address) == b'E'
    with connect(proxy.address) as held:
        held.sendall(b'x')
        wait_for(lambda: api(address, 'GET', '/connections')[1]['connections'],
                 what='the live connection to be listed')
        live = api(address, 'GET', '/connections?proxy=default')[1]['connections']
        assert live[0]['proxy'] == 'default' and live[0]['handler'] == 'errors'
        assert api(address, 'GET', '/connections?proxy=other')[1] == {'connections': []}
    wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    stats = api(address, 'GET', '/stats')[1]
    assert stats['accepted'] == 3 and stats['open'] == 0
    assert stats['to_backend'] >= 5 and stats['to_client'] >= 5 + 1
    assert stats['ended']['eof'] == 1 and stats['ended']['closed'] == 2
    assert api(address, 'GET', '/proxies/default/stats')[1] == stats
    events = api(address, 'GET', '/events?since=%d' % last)[1]['events']
    kinds = [(event['event'], event.get('handler')) for event in events]
    assert kinds[:3] == [('opened', 'normal'), ('closed', 'normal'), ('changed', 'errors')]
    assert events[1]['how'] == 'EOF both ways' and events[1]['to_client'] == 5
    assert events[2]['by'] == 'a Python call'
    assert [event['id'] for event in events] == sorted(event['id'] for event in events)
    assert api(address, 'GET', '/events?since=%d' % events[-1]['id'])[1]['events'] == []
    ring = vaurien.EventLog(size=3)
    for number in range(5):
        ring.record('changed', 'p', {'n': number})
    assert ring.oldest() == 3 and [e['id'] for e in ring.since(1)] == [3, 4, 5]   # 2 lost
    assert api(address, 'GET', '/events?since=0')[1]['oldest'] >= 1
    assert api(address, 'GET', '/events?since=soon')[0] == 400


def test_prometheus_metrics_of_every_proxy(proxy, echo_backend):
    client = proxy.client()
    client.create_proxy('second', '%s:%d' % echo_backend.address)
    assert round_trip(proxy.address) == b'ping'
    wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    conn = http.client.HTTPConnection(*proxy.control, timeout=WAIT)
    conn.request('GET', '/metrics')
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.getheader('Content-Type').startswith('text/plain; version=0.0.4')
    assert 'vaurien_connections_total{proxy="default"} 1\n' in text
    assert 'vaurien_connections_total{proxy="second"} 0\n' in text
    assert 'vaurien_bytes_total{proxy="default",direction="to_client"} 4\n' in text
    assert 'vaurien_connections_ended_total{proxy="default",how="eof"} 1\n' in text
    assert 'vaurien_handler_connections_total{proxy="default",handler="normal"} 1\n' in text
    for line in text.splitlines():                   # the text format, line by line
        assert line.startswith('# ') or re.fullmatch(r'vaurien_\w+\{[^}]*\} \d+', line)


def test_named_proxies_without_a_default_refuse_its_options(tmp_path, echo_backend):
    backend = '%s:%d' % echo_backend.address
    for args, message in ((['--local', LOOP + ':0'], '--local: for the proxy of --distant'),
                          (['--seed', '3'], '--seed: for the proxy of --distant'),
                          (['--proxy', 'a=%s:0,%s' % (LOOP, backend)], "proxy 'a' is given twice")):
        result = run_cli('--proxy', 'a=%s:0,%s' % (LOOP, backend), *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = run_cli('--demo', '--proxy', 'default=%s:0,%s' % (LOOP, backend))
    assert result.returncode == 2 and '"default" names the proxy of' in result.stderr


def test_the_demo_refuses_a_backend_it_would_not_use(tmp_path):
    ini = write(tmp_path, 'v.ini', '[vaurien]\ndistant = %s:9\n' % LOOP)
    for args, where in ((['--distant', LOOP + ':9'], 'not to --distant'),
                        (['--config', ini], 'not to distant in %s' % ini)):
        result = run_cli('--demo', *args)
        assert result.returncode == 2 and result.stderr.count('\n') == 1
        assert 'vaurien: error: --demo proxies to its own backend, %s' % where \
            in result.stderr


def test_updating_a_proxy_onto_itself_changes_nothing(proxy, echo_backend):
    named = proxy.client().create_proxy('n', '%s:%d' % echo_backend.address)
    before = named.status()
    with pytest.raises(vaurien.VaurienError, match='is this proxy itself'):
        named.update(distant=before['local'])
    assert named.status()['distant'] == before['distant']
    assert named.update(local=before['local'])['local'] == before['local']   # where it is
    assert round_trip(vaurien.parse_address(before['local'])) == b'ping'
    assert proxy.client().update(distant='%s:%d' % echo_backend.address)['enabled']


def test_a_path_that_is_no_path_gets_a_json_404(proxy):
    with socket.create_connection(proxy.control, timeout=WAIT) as sock:
        sock.sendall(b'GET handler HTTP/1.1\r\nHost: x\r\n\r\n')
        head = read_all(sock).split(b'\r\n')[0]
    assert head == b'HTTP/1.1 404 Not Found'


def test_one_name_one_proxy_however_many_create_it_at_once(proxy, echo_backend):
    statuses = []

    def create():
        statuses.append(api(proxy.control, 'POST', '/proxies', json.dumps(
            {'name': 'same', 'distant': '%s:%d' % echo_backend.address}))[0])
    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(statuses) == [201] + [409] * 5


# ---------------------------------------------------------------------------
# Stacked faults: layers on top of the handler, each way, live
# ---------------------------------------------------------------------------

def tagging(tag):
    """A non-blocking fault handler that appends `tag` to each chunk it passes on."""
    @vaurien.traits(blocking=False)
    def tag_chunk(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        dest.sendall(data + tag if data else data)
    return tag_chunk


def arrivals(times):
    """A fault handler that notes when each chunk reaches it, and passes it on."""
    def note(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data:
            times.append(time.monotonic())
        dest.sendall(data)
    return note


def test_faults_act_in_stack_order_each_way_and_on_top_of_the_handler(make_proxy,
                                                                       echo_backend):
    proxy = make_proxy(echo_backend.address, handlers={'a': tagging(b'A'),
                                                       'b': tagging(b'B')})
    proxy.add_fault('a', direction='both')
    proxy.add_fault('b', direction='to_client')
    with connect(proxy.address) as sock:
        sock.sendall(b'x')
        assert read_exactly(sock, 4) == b'xAAB'    # A to the backend; A then B back
    wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    proxy.add_fault('b', name='first', index=0, direction='to_client')
    assert [fault['name'] for fault in proxy.get_faults()] == ['first', 'a', 'b']
    proxy.set_handler('corrupt', ratio=0.0)        # the handler stays under the stack
    with connect(proxy.address) as sock:
        sock.sendall(b'y')
        assert read_exactly(sock, 5) == b'yABAB'
    assert [fault['connections'] for fault in proxy.get_faults()] == [1, 2, 2]


def test_a_delay_in_one_layer_delays_what_the_next_layers_see(make_proxy, echo_backend):
    times = []
    proxy = make_proxy(echo_backend.address, handlers={'note': arrivals(times)})
    proxy.add_fault('delay', sleep=0.3, direction='to_client')
    proxy.add_fault('note', direction='to_client')
    proxy.add_fault('delay', sleep=0.2, direction='to_client')
    with connect(proxy.address) as sock:
        started = time.monotonic()
        sock.sendall(b'ping')
        assert read_exactly(sock, 4) == b'ping'
        took = time.monotonic() - started
    assert times[0] - started >= 0.3 and took >= 0.5        # chained: 0.3 then 0.2


def test_eof_passes_the_layers_after_the_data_and_hold_eof_and_false_work_there(
        make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    with proxy.fault('delay', sleep=0.2, direction='to_backend'):
        assert round_trip(proxy.address, b'half') == b'half'   # EOF after the delayed data
    def answer_and_close(sock):
        sock.sendall(sock.recv(10))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(10)
    closing = Backend(answer_and_close)
    hanging = make_proxy(closing.address)
    try:
        with hanging.fault('hang', direction='to_client'):   # HOLD_EOF, in a layer: the
            with connect(hanging.address) as sock:           # answer and its EOF dropped
                sock.sendall(b'q')
                wait_for(lambda: closing.accepted, what='the backend to answer')
                assert outcome(sock, 0.5) == ('open', b'')
    finally:
        closing.close()
    with proxy.fault('limit_data', bytes=3, direction='to_client'):   # False: closed
        with connect(proxy.address) as sock:
            sock.sendall(b'abcdef')
            assert outcome(sock) == ('eof', b'abc')
    with proxy.fault('abort', when='response'):               # abort: an RST
        with connect(proxy.address) as sock:
            sock.sendall(b'req')
            assert outcome(sock)[0] == 'rst'


def test_an_errors_fault_answers_without_the_backend(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    with proxy.fault('errors', protocol='http', status=502):
        with connect(proxy.address) as sock:
            sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            assert read_all(sock).startswith(b'HTTP/1.1 502 Bad Gateway\r\n')
    assert echo_backend.accepted == 0


def test_removing_a_fault_passes_what_it_holds_at_once_in_order(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('delay', sleep=30, direction='to_client')
    with connect(proxy.address) as sock:
        sock.sendall(b'held')
        wait_for(lambda: echo_backend.accepted, what='the backend to get it')
        time.sleep(0.1)
        started = time.monotonic()
        proxy.remove_fault('delay')
        sock.sendall(b'next')
        assert read_exactly(sock, 8) == b'heldnext'
        assert time.monotonic() - started < 5
    assert proxy.get_faults() == []


class Sequence:
    """A client that sends the 4-byte numbers 0..count-1 in random-sized writes, and
    checks that the echo brings every one back once, in order."""

    def __init__(self, address, count):
        self.sock = connect(address)
        self.payload = b''.join(struct.pack('!I', number) for number in range(count))
        self.echoed = bytearray()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        self.sock.settimeout(WAIT * 3)
        while len(self.echoed) < len(self.payload):
            data = self.sock.recv(65536)
            if not data:
                return
            self.echoed += data

    def send(self, rng, between=lambda part: None, parts=1):
        """Send it all in random-sized writes; `between(n)` after each nth part."""
        view, part = memoryview(self.payload), 0
        while view:
            size = rng.randint(1, 2000)
            self.sock.sendall(view[:size])
            view = view[size:]
            if (len(self.payload) - len(view)) * parts // len(self.payload) > part:
                part += 1
                between(part)

    def check(self):
        self.reader.join(WAIT * 3)
        self.sock.close()
        got = bytes(self.echoed)
        assert len(got) == len(self.payload), 'lost or repeated: %d of %d bytes' % (
            len(got), len(self.payload))
        assert got == self.payload, 'reordered or changed at byte %d' % next(
            index for index, (a, b) in enumerate(zip(got, self.payload)) if a != b)


def passing(source, dest, to_backend, name, settings, proxy):
    """A user's fault that may block (no traits): it runs in the connection's thread."""
    dest.sendall(proxy.get_data(source))


def test_65535_sequence_numbers_survive_faults_added_and_removed_live(make_proxy,
                                                                      echo_backend):
    proxy = make_proxy(echo_backend.address, handlers={'passing': passing}, seed=7)
    faults = [{'handler': 'delay', 'sleep': 0.002, 'jitter': 0.001, 'direction': 'both'},
              {'handler': 'slicer', 'size': 300, 'variation': 200, 'delay': 0.0001,
               'direction': 'both'},
              {'handler': 'bandwidth', 'rate': '20MB', 'direction': 'to_client'},
              {'handler': 'normal', 'toxicity': 0.5},
              {'handler': 'passing'},
              {'handler': 'delay', 'sleep': 0, 'direction': 'to_backend', 'toxicity': 0.3}]
    rng = random.Random(11)
    sequence = Sequence(proxy.address, 65535)
    done = threading.Event()
    changes = []

    def churn():
        while not done.is_set():
            spec = dict(rng.choice(faults))
            handler = spec.pop('handler')
            added = proxy.add_fault(handler, index=rng.randint(0, len(proxy.get_faults())),
                                    **spec)
            changes.append(added['name'])
            time.sleep(rng.uniform(0, 0.01))
            if rng.random() < 0.5:
                proxy.update_fault(added['name'], toxicity=rng.random())
            live = proxy.get_faults()
            if len(live) > 2 or rng.random() < 0.3:
                proxy.remove_fault(rng.choice(live)['name'])
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:     # the bytes flow while faults come and go: a change in each 50th of them
        sequence.send(rng, lambda part: wait_for(lambda: len(changes) >= part,
                                                 what='a change of faults'), parts=50)
        sequence.check()
    finally:
        done.set()
        churner.join(WAIT)


def test_toxicity_is_drawn_per_connection_reproducibly_with_a_seed(make_proxy,
                                                                    echo_backend):
    def applied(seed):
        proxy = make_proxy(echo_backend.address, seed=seed)
        proxy.add_fault('errors', protocol='raw', message='E', toxicity=0.5)
        proxy.add_fault('normal', toxicity=0.5)        # another draw: it changes nothing
        return [round_trip(proxy.address, b'p') == b'E' for _ in range(24)]
    first = applied(3)
    assert first == applied(3) and 3 <= sum(first) <= 21
    assert first != applied(4)
    proxy = make_proxy(echo_backend.address)
    with proxy.fault('errors', protocol='raw', message='E', toxicity=0):
        assert round_trip(proxy.address) == b'ping'
        proxy.update_fault('errors', toxicity=1.0)       # drawn again, live too
        assert round_trip(proxy.address) == b'E'


@pytest.mark.parametrize('change', [{'sleep': 0}, {'sleep': 60}, {'toxicity': 1.0}])
def test_a_changed_fault_lets_go_of_what_it_holds_as_toxiproxy(make_proxy, echo_backend,
                                                                change):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('delay', sleep=60, direction='to_client')
    with connect(proxy.address) as sock:
        sock.sendall(b'held')
        assert outcome(sock, 0.3) == ('open', b'')      # the echo waits in the fault
        proxy.update_fault('delay', **change)
        assert read_exactly(sock, 4) == b'held'         # at once, whatever the change
        sock.sendall(b'next')
        if change.get('sleep') == 0:
            assert read_exactly(sock, 4) == b'next'
        else:                                           # what comes next: the settings
            assert outcome(sock, 0.3) == ('open', b'')


@pytest.mark.parametrize('change', [{'sleep': 0}, {'toxicity': 0}])
def test_a_changed_fault_that_held_over_the_high_water_mark_resumes_the_reading(
        make_proxy, change):
    """The reading stopped while the fault held over 1 MiB; what it lets go of on the
    change goes out, and the client is read again: the whole upload, then its EOF."""
    total, received = 3 << 20, []
    backend = Backend(lambda sock: received.append(len(read_all(sock))))
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('delay', sleep=60, direction='to_backend')
        with connect(proxy.address) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(b'x' * total),
                                                      sock.shutdown(socket.SHUT_WR)))
            sender.start()
            wait_for(lambda: proxy._live() and proxy._live()[0].backend.staged
                     >= vaurien.HIGH_WATER and not proxy._live()[0].client.events,
                     what='the reading to stop')
            proxy.update_fault('delay', **change)
            wait_for(lambda: received, what='the whole upload and its EOF')
            sender.join(WAIT)
        assert received == [total]
    finally:
        backend.close()


def test_a_timer_armed_by_a_fault_outlives_a_handler_switch(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('timeout', timeout=0.3, direction='to_client')
    with connect(proxy.address) as sock:
        started = time.monotonic()
        sock.sendall(b'x')
        proxy.set_handler('delay', sleep=0, direction='to_backend')
        assert outcome(sock) == ('eof', b'')              # the echo was swallowed
        assert time.monotonic() - started >= 0.3


def test_faults_through_the_api_and_the_client(proxy, echo_backend):
    client = proxy.client()
    added = client.add_fault('delay', sleep='50ms', direction='downstream', toxicity=0.5)
    assert added == {'name': 'delay', 'handler': 'delay', 'direction': 'to_client',
                     'settings': {'sleep': 0.05, 'jitter': 0.0, 'direction': 'to_client'},
                     'toxicity': 0.5, 'connections': 0, 'ended': {}}
    assert client.update_fault('delay', sleep=0.1)['settings']['sleep'] == 0.1
    assert client.get_faults() == [dict(added, settings=dict(added['settings'], sleep=0.1))]
    address = proxy.control
    assert api(address, 'PUT', '/faults', '{"handler": "delay"}')[0] == 201   # delay_2
    for method, path, body, status, text in [
            ('PUT', '/faults', {'handler': 'delay', 'name': 'delay'}, 409, 'exists already'),
            ('PUT', '/faults', {'handler': 'delay', 'name': 'a\ud800'}, 400, 'surrogate'),
            ('PUT', '/faults', {'handler': 'errors', 'settings': {'message': '\ud800'}}, 400,
             'no lone surrogate'),
            ('PUT', '/faults', {'handler': 'dela'}, 400, 'did you mean delay?'),
            ('PUT', '/faults', {'handler': 'delay', 'sleep': 1}, 400, 'unknown key'),
            ('PUT', '/faults', {'handler': 'delay', 'toxicity': 2}, 400, 'toxicity 2'),
            ('PUT', '/faults', {'handler': 'delay', 'direction': 'up'}, 400, 'direction'),
            ('PATCH', '/faults/delay', {'settings': {'sleep': -1}}, 400, 'sleep'),
            ('PATCH', '/faults/delay', {'settings': {'direction': 'both'}}, 400, 'remove'),
            ('GET', '/faults/nope', None, 404, 'no fault named nope'),
            ('DELETE', '/proxies/default/faults/nope', None, 404, 'no fault')]:
        answer = api(address, method, path, body and json.dumps(body))
        assert answer[0] == status and text in answer[1]['error'], (path, answer)
    assert api(address, 'GET', '/proxies/default/faults/delay')[1]['settings']['sleep'] == 0.1
    with client.faults('hang', {'handler': 'corrupt', 'ratio': 1}) as added:
        assert [fault['name'] for fault in added] == ['hang', 'corrupt']
        assert len(client.get_faults()) == 4
    assert [fault['name'] for fault in client.clear_faults()] == ['delay', 'delay_2']
    assert client.get_faults() == [] and round_trip(proxy.address) == b'ping'
    with pytest.raises(vaurien.VaurienError, match='cannot be sent a function'):
        client.add_fault(passing)


def test_fault_counts_events_and_metrics(proxy):
    last = api(proxy.control, 'GET', '/events')[1]['last']
    proxy.add_fault('errors', protocol='raw', message='E')
    assert round_trip(proxy.address) == b'E'
    wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    stats = api(proxy.control, 'GET', '/stats')[1]
    assert stats['faults'] == {'errors': {'connections': 1, 'ended': {'closed': 1}}}
    events = api(proxy.control, 'GET', '/events?since=%d' % last)[1]['events']
    assert events[-2]['event'] == 'opened' and events[-2]['faults'] == ['errors']
    assert events[-1]['event'] == 'closed' and events[-1]['faults'] == ['errors']
    assert [e['fault']['name'] for e in events if e['event'] == 'changed'] == ['errors']
    conn = http.client.HTTPConnection(*proxy.control, timeout=WAIT)
    conn.request('GET', '/metrics')
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'vaurien_fault_connections_total{proxy="default",fault="errors"} 1\n' in text
    with connect(proxy.address):
        wait_for(lambda: api(proxy.control, 'GET', '/connections')[1]['connections'],
                 what='the connection to be listed')
        live = api(proxy.control, 'GET', '/connections')[1]['connections']
        assert live[0]['faults'] == ['errors']


# ---------------------------------------------------------------------------
# Toxiproxy's API: its clients drive Vaurien unchanged
# ---------------------------------------------------------------------------

@pytest.fixture
def toxiproxy():
    """Vaurien's Toxiproxy API on a free port, with no proxy; a caller of it."""
    server = vaurien.ToxiproxyServer((LOOP, 0)).start()

    def call(method, path, body=None, headers=None):
        """(status, headers, body text) of one request, sent as a client sends it."""
        conn = http.client.HTTPConnection(*server.server_address, timeout=WAIT)
        try:
            conn.request(method, path, body if body is None or isinstance(body, str)
                         else json.dumps(body), dict({'User-Agent': 'toxiproxy-test'},
                                                     **(headers or {})))
            response = conn.getresponse()
            return response.status, response.headers, response.read().decode()
        finally:
            conn.close()
    call.server = server
    yield call
    server.stop(proxies=True)


def test_toxiproxy_api_errors_are_toxiproxys_word_for_word(toxiproxy, echo_backend):
    """The answers of toxiproxy-server 2.12 to the same requests, as it sends them."""
    upstream = '%s:%d' % echo_backend.address
    assert toxiproxy('GET', '/proxies')[::2] == (200, '{}')
    assert raw_api(toxiproxy.server.server_address[:2], b'GET /proxies\r\n\r\n').startswith(
        b'HTTP/1.1 400 ')       # no HTTP version: refused, with a status line, as Go does
    for method, path, body, status, error in [
            ('POST', '/proxies', '{"name": 5}', 400, 'bad request body: json: cannot unmarshal '
             'number into Go struct field Proxy.name of type string'),
            ('POST', '/proxies', '', 400, 'bad request body: EOF'),
            ('POST', '/proxies', '{"name": "a"', 400, 'bad request body: unexpected EOF'),
            ('POST', '/proxies', 'xx', 400, "bad request body: invalid character 'x' looking "
             'for beginning of value'),
            ('POST', '/proxies', '[]', 400, 'bad request body: json: cannot unmarshal array '
             'into Go value of type toxiproxy.Proxy'),
            ('POST', '/proxies', '[' * 60000, 400, "bad request body: invalid character '[' "
             'exceeded max depth'),
            ('POST', '/proxies', '{"upstream": "x:1"}', 400, 'missing required field: name'),
            ('POST', '/proxies', '{"name": "a"}', 400, 'missing required field: upstream'),
            ('GET', '/proxies/nope', None, 404, 'proxy not found'),
            ('DELETE', '/proxies/nope', None, 404, 'proxy not found'),
            ('POST', '/proxies/nope/toxics', '{}', 404, 'proxy not found')]:
        answer = toxiproxy(method, path, body)
        assert answer[0] == status and answer[2] == json.dumps(
            {'error': error, 'status': status}, separators=(',', ':')) + '\n', (path, answer)
        assert answer[1]['Content-Type'] == 'text/plain; charset=utf-8'
        assert answer[1]['X-Content-Type-Options'] == 'nosniff'
    status, headers, body = toxiproxy('POST', '/proxies', {
        'Name': 'a', 'UPSTREAM': upstream, 'listen': 'localhost:0', 'extra': 1})
    port = json.loads(body)['listen'].split(':')[1]
    assert status == 201 and headers['Content-Type'] == 'application/json'
    assert body == ('{"name":"a","listen":"127.0.0.1:%s","upstream":"%s","enabled":true,'
                    '"Logger":{},"toxics":[]}' % (port, upstream))
    assert re.fullmatch('[0-9a-v]{20}', headers['X-Toxiproxy-Request-Id'])
    for method, path, body, status, error in [
            ('POST', '/proxies', {'name': 'a', 'upstream': upstream}, 409,
             'proxy already exists'),
            ('POST', '/proxies', {'name': 'b', 'upstream': upstream,
                                  'listen': 'localhost:' + port}, 500,   # Go's: resolved
             'listen tcp 127.0.0.1:%s: bind: address already in use' % port),
            ('POST', '/proxies/a/toxics', {'type': 'latency', 'stream': 'sideways'}, 400,
             'stream was invalid, can be either upstream or downstream'),
            ('POST', '/proxies/a/toxics', {'type': 'nope'}, 400, 'invalid toxic type'),
            ('POST', '/proxies/a/toxics', {'type': 'latency', 'attributes': {'latency': 1.5}},
             400, 'bad request body: json: cannot unmarshal number 1.5 into Go struct field '
             'LatencyToxic.attributes.latency of type int64'),
            ('POST', '/proxies/a/toxics', {'type': 'latency', 'toxicity': 'x'}, 400,
             'bad request body: json: cannot unmarshal string into Go struct field '
             'ToxicWrapper.toxicity of type float32'),
            ('GET', '/proxies/a/toxics/nope', None, 404, 'toxic not found'),
            ('PATCH', '/proxies/a', '', 400, 'bad request body: EOF')]:
        answer = toxiproxy(method, path, body)
        assert answer[0] == status and json.loads(answer[2]) == {
            'error': error, 'status': status}, (path, answer)
    assert toxiproxy('GET', '/nope')[::2] == (404, '404 page not found\n')
    assert toxiproxy('PUT', '/proxies')[::2] == (405, '')
    assert toxiproxy('GET', '/proxies', headers={'User-Agent': 'Mozilla/5.0'})[::2] == (
        403, 'User agent not allowed\n')
    status, headers, body = toxiproxy('GET', '/version')
    assert (status, body) == (200, '{"version": "2.12.0"}\n')
    assert headers['Content-Type'] == 'application/json;charset=utf-8'


def test_toxiproxy_toxics_are_made_updated_and_listed_as_toxiproxy_does(toxiproxy,
                                                                         echo_backend):
    upstream = '%s:%d' % echo_backend.address
    toxiproxy('POST', '/proxies', {'name': 'a', 'upstream': upstream, 'listen': LOOP + ':0'})
    made = toxiproxy('POST', '/proxies/a/toxics', {
        'type': 'latency', 'stream': 'UpStream', 'attributes': {'latency': 5, 'bogus': 1},
        'toxicity': 0.3})
    assert made[0] == 200 and made[2] == (
        '{"attributes":{"latency":5,"jitter":0},"name":"latency_UpStream","type":"latency",'
        '"stream":"UpStream","toxicity":0.3}')
    assert toxiproxy('POST', '/proxies/a/toxics', {'type': 'noop'})[2] == (
        '{"attributes":{},"name":"noop_downstream","type":"noop","stream":"downstream",'
        '"toxicity":1}')
    assert json.loads(toxiproxy('POST', '/proxies/a/toxics', {
        'type': 'latency', 'name': 'latency_UpStream', 'stream': 'downstream'})[2])[
        'error'] == 'toxic already exists'
    toxiproxy('POST', '/proxies/a/toxics', {'type': 'bandwidth', 'name': 'bw',
                                            'attributes': {'rate': 100}})
    toxiproxy('POST', '/proxies/a/toxics', {'type': 'slicer', 'stream': 'upstream',
                                            'attributes': {'average_size': 10}})
    names = [toxic['name'] for toxic in json.loads(toxiproxy('GET', '/proxies/a/toxics')[2])]
    assert names == ['latency_UpStream', 'slicer_upstream', 'noop_downstream', 'bw']
    updated = toxiproxy('PATCH', '/proxies/a/toxics/bw', {'attributes': {'rate': 5}})
    assert json.loads(updated[2])['attributes'] == {'rate': 5}
    assert json.loads(toxiproxy('POST', '/proxies/a/toxics/bw', {'toxicity': 0.5})[2])[
        'toxicity'] == 0.5
    assert json.loads(toxiproxy('PATCH', '/proxies/a/toxics/bw', {})[2])['toxicity'] == 0.5
    proxy = toxiproxy.server.proxies['a']
    assert proxy.find_fault('bw').settings['rate'] == 5000         # KB/s: 1000 bytes
    assert proxy.find_fault('latency_UpStream').direction == 'to_backend'
    assert toxiproxy('DELETE', '/proxies/a/toxics/bw')[::2] == (204, '')
    assert toxiproxy('DELETE', '/proxies/a/toxics/bw')[0] == 404
    mysql = json.loads(toxiproxy('POST', '/proxies/a/toxics', {
        'type': 'errors', 'attributes': {'protocol': 'mysql', 'code': '1040'}})[2])
    assert mysql['attributes']['protocol'] == 'mysql' and mysql['stream'] == 'downstream'
    assert proxy.find_fault('errors_downstream').direction == 'both'   # the whole connection
    assert toxiproxy('POST', '/reset')[::2] == (204, '')
    assert toxiproxy('GET', '/proxies/a/toxics')[2] == '[]'


def test_toxiproxy_proxies_disabled_updated_populated_and_reset(toxiproxy, echo_backend):
    upstream = '%s:%d' % echo_backend.address
    made = json.loads(toxiproxy('POST', '/proxies', {'name': 'c', 'upstream': upstream,
                                                     'listen': LOOP + ':0',
                                                     'enabled': False})[2])
    assert made['listen'] == LOOP + ':0' and made['enabled'] is False   # never listened
    shown = json.loads(toxiproxy('PATCH', '/proxies/c', {'enabled': True})[2])
    address = vaurien.parse_address(shown['listen'])
    assert shown['enabled'] and round_trip(address) == b'ping'
    with connect(address) as held:
        held.sendall(b'x')
        assert read_exactly(held, 1) == b'x'
        assert json.loads(toxiproxy('PATCH', '/proxies/c', {'enabled': False})[2])[
            'listen'] == shown['listen']            # the bound address, once it listened
        assert outcome(held)[0] in ('eof', 'rst')   # down: live connections end...
    with pytest.raises(ConnectionRefusedError):     # ... and connects are refused
        socket.create_connection(address, timeout=WAIT).close()
    assert toxiproxy('POST', '/reset')[0] == 204                      # enabled again
    assert round_trip(address) == b'ping'
    toxiproxy('POST', '/proxies/c/toxics', {'type': 'noop'})
    entries = [{'name': 'c', 'upstream': upstream, 'listen': shown['listen']},
               {'name': 'd', 'upstream': upstream, 'listen': LOOP + ':0'}]
    status, headers, body = toxiproxy('POST', '/populate', entries)
    populated = json.loads(body)['proxies']
    assert status == 201 and headers['Content-Type'] == 'application/json'
    assert [p['name'] for p in populated] == ['c', 'd'] and populated[0]['toxics']  # kept
    entries[0]['upstream'] = '%s:%d' % (LOOP, free_port())                           # changed
    populated = json.loads(toxiproxy('POST', '/populate', entries)[2])['proxies']
    assert populated[0]['toxics'] == [] and populated[0]['upstream'] == entries[0]['upstream']
    assert toxiproxy('POST', '/populate', [entries[1], {'name': 'e'}])[::2] == (400, (
        '{"error":"missing required field: upstream at proxy 2","status":400,'
        '"proxies":null}'))
    taken = json.loads(toxiproxy('GET', '/proxies/d')[2])['listen']
    status, _, body = toxiproxy('POST', '/populate', [
        {'name': 'f', 'upstream': upstream, 'listen': LOOP + ':0'},
        {'name': 'g', 'upstream': upstream, 'listen': taken}])
    assert status == 500 and [p['name'] for p in json.loads(body)['proxies']] == ['f']
    moved = json.loads(toxiproxy('POST', '/proxies/d', {'listen': LOOP + ':0'})[2])
    assert round_trip(vaurien.parse_address(moved['listen'])) == b'ping'
    if moved['listen'] != taken:     # bind(0) may give the port just freed: 1 in 14,000
        with pytest.raises(ConnectionRefusedError):
            connect(vaurien.parse_address(taken))
    assert toxiproxy('DELETE', '/proxies/d')[::2] == (204, '')
    assert sorted(json.loads(toxiproxy('GET', '/proxies')[2])) == ['c', 'f']
    status, headers, text = toxiproxy('GET', '/metrics')
    assert status == 200 and headers['Content-Type'].startswith('text/plain; version=0.0.4')
    assert 'vaurien_connections_total{proxy="c"} ' in text


def ipv6_listens():
    try:
        socket.create_server(('::', 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_listens(), reason='no IPv6 here')
def test_toxiproxy_addresses_without_a_host_as_go_reads_them(toxiproxy, echo_backend):
    made = json.loads(toxiproxy('POST', '/proxies', {
        'name': 'any', 'listen': ':0', 'upstream': ':%d' % echo_backend.address[1]})[2])
    host, port = vaurien.parse_address(made['listen'])      # every interface, as Toxiproxy
    assert host == '::' and made['upstream'] == ':%d' % echo_backend.address[1]
    assert round_trip((LOOP, port)) == b'ping'             # upstream: this machine


@pytest.mark.parametrize('stream', ['upstream', 'downstream'])
def test_toxiproxy_timeout_ends_the_connection_at_an_eof_it_swallows(toxiproxy, stream):
    def serve(sock):        # answers, then closes at once (downstream) or on the client's EOF
        sock.recv(100)
        sock.sendall(b'answer')
        if stream == 'upstream':
            read_all(sock)
    backend = Backend(serve)
    try:
        made = json.loads(toxiproxy('POST', '/proxies', {
            'name': 't', 'listen': LOOP + ':0', 'upstream': '%s:%d' % backend.address})[2])
        toxiproxy('POST', '/proxies/t/toxics', {'type': 'timeout', 'stream': stream,
                                                'attributes': {'timeout': 60000}})
        with connect(vaurien.parse_address(made['listen'])) as sock:
            sock.sendall(b'request')
            if stream == 'upstream':
                sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            assert outcome(sock)[0] == 'eof' and time.monotonic() - started < WAIT
    finally:
        backend.close()


def test_toxiproxy_toxics_act_on_the_wire_with_its_units(toxiproxy, echo_backend):
    upstream = '%s:%d' % echo_backend.address
    shown = json.loads(toxiproxy('POST', '/proxies', {'name': 'w', 'upstream': upstream,
                                                      'listen': LOOP + ':0'})[2])
    address = vaurien.parse_address(shown['listen'])

    def toxic(body):
        answer = toxiproxy('POST', '/proxies/w/toxics', body)
        assert answer[0] == 200, answer
        return json.loads(answer[2])['name']

    def timed(payload=b'ping'):
        started = time.monotonic()
        with connect(address) as sock:
            sock.sendall(payload)
            got = read_exactly(sock, len(payload))
        return got, time.monotonic() - started
    name = toxic({'type': 'latency', 'attributes': {'latency': 300}})         # ms
    got, took = timed()
    assert got == b'ping' and took >= 0.3
    toxiproxy('DELETE', '/proxies/w/toxics/' + name)
    name = toxic({'type': 'bandwidth', 'attributes': {'rate': 100}})          # KB/s
    got, took = timed(b'x' * 50000)
    assert took >= 0.3                                                         # 0.5 s ideally
    toxiproxy('DELETE', '/proxies/w/toxics/' + name)
    name = toxic({'type': 'limit_data', 'attributes': {'bytes': 3}})
    with connect(address) as sock:
        sock.sendall(b'abcdef')
        assert outcome(sock) == ('eof', b'abc')
    toxiproxy('DELETE', '/proxies/w/toxics/' + name)
    name = toxic({'type': 'reset_peer', 'stream': 'upstream', 'attributes': {'timeout': 100}})
    with connect(address) as sock:
        sock.sendall(b'abc')
        assert outcome(sock) == ('rst', b'')
    toxiproxy('DELETE', '/proxies/w/toxics/' + name)
    name = toxic({'type': 'timeout', 'attributes': {'timeout': 0}})           # forever
    with connect(address) as sock:
        sock.sendall(b'abc')
        assert outcome(sock, 0.5) == ('open', b'')        # dropped, held
        toxiproxy('DELETE', '/proxies/w/toxics/' + name)   # as Toxiproxy: then closed
        assert outcome(sock)[0] == 'eof'
    name = toxic({'type': 'errors', 'attributes': {'protocol': 'http', 'status': 503}})
    with connect(address) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_all(sock).startswith(b'HTTP/1.1 503 Service Unavailable\r\n')
    toxiproxy('DELETE', '/proxies/w/toxics/' + name)
    toxic({'type': 'slicer', 'attributes': {'average_size': 2, 'delay': 1000}})   # µs
    assert timed(b'sliced!')[0] == b'sliced!'


def test_toxiproxy_api_beside_the_native_one_shares_the_proxies(echo_backend):
    upstream = '%s:%d' % echo_backend.address
    cli = CliProxy('--distant', upstream, '--toxiproxy-api', '%s:0' % LOOP)
    try:
        line = next(line for line in cli.lines if 'Vaurien Toxiproxy API: ' in line)
        api_address = vaurien.parse_address(line.split('http://')[1].strip())
        conn = http.client.HTTPConnection(*api_address, timeout=WAIT)
        conn.request('GET', '/proxies')
        listed = json.loads(conn.getresponse().read())
        assert list(listed) == ['default'] and listed['default']['upstream'] == upstream
        conn.request('POST', '/proxies', json.dumps({'name': 'extra', 'upstream': upstream,
                                                     'listen': LOOP + ':0'}))
        assert conn.getresponse().read() and Client(*cli.control).proxy('extra').status()[
            'distant'] == upstream
        conn.request('POST', '/proxies/default/toxics', json.dumps(
            {'type': 'errors', 'attributes': {'protocol': 'raw', 'message': 'E'}}))
        conn.getresponse().read()
        conn.close()
        assert round_trip(cli.address) == b'E'
        assert Client(*cli.control).get_faults()[0]['name'] == 'errors_downstream'
    finally:
        cli.stop()


def test_vaurien_toxiproxy_mode_starts_empty_or_from_a_config(tmp_path, echo_backend):
    config = write(tmp_path, 'proxies.json', json.dumps([
        {'name': 'web', 'upstream': '%s:%d' % echo_backend.address, 'listen': LOOP + ':0'}]))
    process = subprocess.Popen([sys.executable, VAURIEN, 'toxiproxy', '-host', LOOP,
                                '-port', '0', '-config', str(config), '-seed', '7',
                                '-proxy-metrics', '-runtime-metrics'],   # its flags, all
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith('Vaurien ready: Toxiproxy API http://'):
                break
        api_address = vaurien.parse_address(lines[-1].split('http://')[1].strip())
        proxy_line = next(line for line in lines if line.startswith('Vaurien proxy web: '))
        local = vaurien.parse_address(proxy_line.split()[3])
        assert round_trip(local) == b'ping'
        conn = http.client.HTTPConnection(*api_address, timeout=WAIT)
        conn.request('GET', '/proxies/web')
        assert json.loads(conn.getresponse().read())['name'] == 'web'
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        process.stderr.close()
    for flag in ('-version', '-help'):
        result = run_cli('toxiproxy', flag)
        assert result.returncode == 0 and ('2.12.0' in result.stdout if flag == '-version'
                                           else '-seed SEED' in result.stdout)
    bad = write(tmp_path, 'bad.json', '[{"name": "web"}]')
    result = run_cli('toxiproxy', '-port', '0', '-config', str(bad))
    assert result.returncode == 2 and result.stderr.strip() == (
        'vaurien: error: %s: missing required field: upstream at proxy 1' % bad)


def test_the_toxiproxy_python_client_drives_vaurien(toxiproxy, echo_backend):
    client_module = pytest.importorskip('toxiproxy', reason='pip install toxiproxy-python')
    server = client_module.Toxiproxy()
    server.update_api_consumer(*toxiproxy.server.server_address)
    upstream = '%s:%d' % echo_backend.address
    proxy = server.create(upstream=upstream, name='py')
    assert server.running() and json.loads(server.version())['version'] == '2.12.0'
    address = vaurien.parse_address(proxy.listen)
    proxy.add_toxic(type='latency', attributes={'latency': 200})
    started = time.monotonic()
    assert round_trip(address) == b'ping' and time.monotonic() - started >= 0.2
    assert list(proxy.toxics()) == ['latency_downstream']
    proxy.destroy_toxic('latency_downstream')
    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=WAIT).close()
    assert round_trip(address) == b'ping'
    with pytest.raises(client_module.exceptions.ProxyExists):
        server.create(upstream=upstream, name='py')
    assert [p.name for p in server.populate([{'name': 'py2', 'upstream': upstream,
                                              'listen': LOOP + ':0'}])] == ['py2']
    server.reset()
    server.destroy_all()
    assert server.proxies() == {}


NODE_CLIENT = r'''
const {Toxiproxy} = require("toxiproxy-node-client");
(async () => {
  const toxiproxy = new Toxiproxy(process.argv[2]);
  const proxy = await toxiproxy.createProxy(
    {name: "node", listen: "127.0.0.1:0", upstream: process.argv[3]});
  const toxic = await proxy.addToxic({type: "latency", attributes: {latency: 200}});
  const errors = await proxy.addToxic(
    {type: "errors", stream: "upstream", attributes: {protocol: "raw", message: "E"},
     toxicity: 0});
  const listed = await toxiproxy.get("node");
  const version = await toxiproxy.getVersion();
  console.log(JSON.stringify({listen: proxy.listen, toxic: toxic.name, errors: errors.name,
                              listed: listed.name, version: version}));
})().catch((error) => { console.error(error); process.exit(1); });
'''


def test_the_toxiproxy_node_client_drives_vaurien(toxiproxy, echo_backend, tmp_path):
    """toxiproxy-node-client (npm), where node and it are installed (.ci/run puts it
    in .node/, beside this file)."""
    node = shutil.which('node')
    modules = os.environ.get('NODE_PATH') or os.path.join(HERE, '.node', 'node_modules')
    if not node or not os.path.isdir(os.path.join(modules, 'toxiproxy-node-client')):
        pytest.skip('node and toxiproxy-node-client are not installed (npm install --prefix '
                    '.node toxiproxy-node-client)')
    script = write(tmp_path, 'client.js', NODE_CLIENT)
    result = subprocess.run(
        [node, str(script), 'http://%s:%d' % toxiproxy.server.server_address,
         '%s:%d' % echo_backend.address], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, NODE_PATH=modules))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer['toxic'] == 'latency_downstream' and answer['errors'] == 'errors_upstream'
    assert answer['listed'] == 'node' and '2.12.0' in json.dumps(answer['version'])
    started = time.monotonic()
    assert round_trip(vaurien.parse_address(answer['listen'])) == b'ping'   # toxicity 0
    assert time.monotonic() - started >= 0.2


# -- what a review of the faults and the Toxiproxy API found --------------------------

def chunks_then_close(count, size=10, pause=0.02):
    """A backend that sends `count` chunks of `size` bytes ('0000000000', '1111111111'...),
    `pause` seconds apart, then waits for the client to leave."""
    def serve(sock):
        for number in range(count):
            sock.sendall(str(number % 10).encode() * size)
            time.sleep(pause)
        sock.recv(10)
    return serve


def test_nothing_passes_the_fault_that_closed_the_connection(make_proxy):
    backend = Backend(chunks_then_close(5))
    try:
        proxy = make_proxy(backend.address)
        with proxy.faults({'handler': 'delay', 'sleep': 0.2, 'direction': 'to_client'},
                          {'handler': 'limit_data', 'bytes': 10, 'direction': 'to_client'}):
            with connect(proxy.address) as sock:
                assert outcome(sock) == ('eof', b'0' * 10)    # not the chunks delayed after
        with proxy.faults({'handler': 'delay', 'sleep': 0.2, 'direction': 'to_client'},
                          {'handler': 'timeout', 'timeout': 0.25, 'direction': 'to_client'}):
            with connect(proxy.address) as sock:
                assert outcome(sock) == ('eof', b'')          # all swallowed, then closed
    finally:
        backend.close()


def test_a_fault_closing_while_a_layer_before_it_passes_pieces_ends_the_connection(make_proxy):
    """slicer passes one-byte pieces with no pause, in one go; limit_data, after it,
    closes at the third, and slicer's layer drops the rest (it was counted twice: the
    connection waited forever for bytes below zero)."""
    backend = Backend(lambda sock: sock.sendall(b'abcdefgh') or sock.recv(10))
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('slicer', size=1, delay=0, direction='to_client')
        proxy.add_fault('limit_data', bytes=3, direction='to_client')
        with connect(proxy.address) as sock:
            assert outcome(sock) == ('eof', b'abc')
        wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    finally:
        backend.close()


@pytest.mark.parametrize('faults', [False, True])
def test_a_reset_waits_for_no_pause(make_proxy, faults):
    """slicer paces the request with a 1 s pause after its last piece; the client's reset
    reaches the backend at once, not after the pause: on the backend's side itself,
    and in a fault layer, where limit_data's close had queued an EOF behind the pause."""
    seen = []

    def serve(sock):
        sock.sendall(sock.recv(10).upper())
        started = time.monotonic()
        seen.append(outcome(sock) + (time.monotonic() - started,))
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        proxy.set_handler('slicer', size=10, delay=1.0, direction='to_backend')
        if faults:
            proxy.add_fault('limit_data', bytes=2, direction='to_client')
        sock = connect(proxy.address)
        sock.sendall(b'ab')
        assert read_exactly(sock, 2) == b'AB'
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.close()     # a reset
        wait_for(lambda: seen, what='the backend to see the end')
        (how, data, seconds), = seen
        assert (how, data) == ('rst', b'')
        assert seconds < 0.8
    finally:
        backend.close()


class Suffixed:
    """Appends its suffix to each chunk: a handler that is a callable object, neither
    hashable (as a dataclass's instances) nor weakly referable (__slots__).

    Settings: none.
    """
    __slots__ = ('suffix',)
    __hash__ = None

    def __init__(self, suffix):
        self.suffix = suffix

    def __call__(self, source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        dest.sendall(data + self.suffix if data else data)


class PumpSuffixed(Suffixed):
    __doc__ = Suffixed.__doc__
    __slots__ = ()
    blocking = False     # called by the pump itself


@pytest.mark.parametrize('kind', [Suffixed, PumpSuffixed])
def test_a_callable_object_is_a_handler_and_a_fault(make_proxy, echo_backend, kind):
    proxy = make_proxy(echo_backend.address)
    proxy.register('suffixed', kind(b'!'))
    proxy.set_handler('suffixed')
    proxy.add_fault(kind(b'?'), direction='to_client')
    with connect(proxy.address) as sock:
        sock.sendall(b'hi')            # the handler's ! each way, then the fault's ?
        assert read_exactly(sock, 5) == b'hi!!?'


def test_a_users_wrapper_of_a_directional_handler_is_called_as_a_fault(make_proxy, echo_backend):
    """A fault calls a @directional handler without its direction filter, but a user's
    own wrapper around it (made with functools.wraps) is still called."""
    calls = []

    def counted(func):
        @functools.wraps(func)
        def wrapper(source, dest, to_backend, name, settings, proxy):
            calls.append(to_backend)
            return func(source, dest, to_backend, name, settings, proxy)
        return wrapper

    @counted
    @vaurien.directional
    def shout(source, dest, to_backend, name, settings, proxy):
        """Upper-cases the traffic of its direction.

        Settings:
          direction (to_backend|to_client|both, default to_client): the traffic changed.
        """
        dest.sendall(proxy.get_data(source).upper())
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault(shout, direction='to_client')
    with connect(proxy.address) as sock:
        sock.sendall(b'hello')
        assert read_exactly(sock, 5) == b'HELLO'
        assert calls == [False]     # before the close: its EOF is a call too


@pytest.mark.parametrize('fault', ['normal', 'bandwidth'])
def test_a_client_gone_while_a_fault_sends_keeps_what_waits_for_the_backend(make_proxy, fault):
    """The client is gone when a fault's call sends it an answer: that is no close by the
    fault, and the request a delay holds for the backend still goes, then the reset."""
    received = []

    def serve(sock):
        sock.sendall(b'a' * 100)
        time.sleep(0.2)
        sock.sendall(b'b' * 100)     # meets the client's reset
        received.append(outcome(sock))
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('delay', sleep=0.5, direction='to_backend')
        proxy.add_fault(fault, direction='both')
        sock = connect(proxy.address)
        sock.sendall(b'REQ')
        sock.close()
        wait_for(lambda: received, what='the backend to see the end')
        assert received == [('rst', b'REQ')]
    finally:
        backend.close()


@pytest.mark.parametrize('how', ['handler', 'fault'])
def test_the_pause_after_a_paced_piece_holds_an_unpaced_send_after_it(make_proxy, how):
    """The pause after the last piece of a paced send holds what the handler sends next,
    paced or not, and the EOF."""
    @vaurien.traits(blocking=False)
    def trailed(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data and not to_backend:
            dest.sendall(data, pace=lambda available: (available, 0.5))
            dest.sendall(b'|T')
        elif data:
            dest.sendall(data)
        else:
            dest.shutdown()
    backend = Backend(lambda sock: sock.recv(10) and sock.sendall(b'DATA'))
    try:
        proxy = make_proxy(backend.address)
        proxy.register('trailed', trailed)
        if how == 'handler':
            proxy.set_handler('trailed')
        else:
            proxy.add_fault('trailed', direction='to_client')
        with connect(proxy.address) as sock:
            started = time.monotonic()      # before the DATA piece went, and its pause began
            sock.sendall(b'go')
            assert read_exactly(sock, 4) == b'DATA'
            assert outcome(sock) == ('eof', b'|T')
            assert time.monotonic() - started >= 0.49
    finally:
        backend.close()


def test_a_removed_fault_passes_on_the_eof_it_held(make_proxy):
    def answer_and_close(sock):
        sock.sendall(sock.recv(10))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(10)
    backend = Backend(answer_and_close)
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('hang', direction='to_client')     # drops the answer, holds its EOF
        with connect(proxy.address) as sock:
            sock.sendall(b'ping')
            wait_for(lambda: proxy._live() and proxy._live()[0].backend.eof_read,
                     what="the backend's EOF to reach the fault")
            assert outcome(sock, 0.2) == ('open', b'')
            proxy.remove_fault('hang')
            assert outcome(sock) == ('eof', b'')            # the EOF it held goes on
    finally:
        backend.close()


def test_a_timeout_ends_when_the_client_leaves(make_proxy):
    idle = Backend(lambda sock: sock.recv(10) and sock.recv(10))    # never answers
    try:
        proxy = make_proxy(idle.address)
        proxy.add_fault('timeout', timeout=0, direction='to_backend', client_eof='close')
        for _ in range(3):
            with connect(proxy.address) as sock:
                sock.sendall(b'x')
        wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    finally:
        idle.close()


def test_timers_of_a_fault_end_with_their_connection(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('timeout', timeout='1h', direction='to_client')
    for _ in range(20):
        with connect(proxy.address) as sock:
            sock.sendall(b'x')
    wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    held = [timer for timer in list(proxy.pump.timers)
            if getattr(timer[2], '__func__', None) is vaurien.Connection._timer]
    assert held == []      # cancelled: no ended connection is kept for an hour


def test_a_connection_ended_while_a_delay_holds_its_data_is_not_kept_by_its_wake_up(
        make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('delay', sleep=3600)
    socks = [connect(proxy.address) for _ in range(5)]
    for sock in socks:
        sock.sendall(b'x')
    wait_for(lambda: proxy.connection_count == 5 and all(
        conn.backend.queue for conn in proxy._live()), what='the data held')
    proxy.disable()
    for sock in socks:
        sock.close()
    wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    held = [timer for timer in list(proxy.pump.timers)
            if getattr(timer[2], '__self__', None).__class__ is vaurien.Connection]
    assert held == []      # cancelled: no ended connection is kept for an hour


def test_transient_and_flap_count_from_when_the_fault_was_added(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    for _ in range(4):
        assert round_trip(proxy.address) == b'ping'
    with proxy.fault('transient', count=2, protocol='raw', message='E'):
        assert [round_trip(proxy.address) for _ in range(3)] == [b'E', b'E', b'ping']
    assert echo_backend.accepted == 5          # the failing ones never reached it


def test_bad_fault_requests_are_400s_and_names_are_drawn_in_the_pump(proxy):
    address = proxy.control
    for body in ({'handler': 'delay', 'direction': []}, {'handler': 'delay', 'index': 10**30},
                 {'handler': 'delay', 'index': -1}):
        assert api(address, 'PUT', '/faults', json.dumps(body))[0] == 400, body
    api(address, 'PUT', '/faults', '{"handler": "delay"}')
    assert api(address, 'PATCH', '/faults/delay', json.dumps(
        {'settings': {'direction': {}}}))[0] == 400
    answers = []
    callers = [threading.Thread(target=lambda: answers.append(api(
        address, 'PUT', '/faults', '{"handler": "corrupt"}')[0])) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(WAIT)
    assert answers == [201] * 8 and len(proxy.get_faults()) == 9
    with proxy.fault('hang'):
        proxy.remove_fault('hang')           # gone in the block: the exit says nothing


def test_toxiproxy_api_reads_every_body_and_never_drops_a_bad_one(toxiproxy, echo_backend):
    upstream = '%s:%d' % echo_backend.address
    toxiproxy('POST', '/proxies', {'name': 'p', 'upstream': upstream, 'listen': LOOP + ':0'})
    smuggled = b'DELETE /proxies/p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n'
    with connect(toxiproxy.server.server_address) as sock:   # a browser's, with a request
        sock.sendall(b'POST /proxies HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(smuggled) + smuggled +
                     b'GET /version HTTP/1.1\r\nHost: x\r\n\r\n')
        answer = b''
        while answer.count(b'HTTP/1.1 ') < 2 or not answer.endswith(b'}\n'):
            answer += sock.recv(65536)
    assert answer.startswith(b'HTTP/1.1 403 ') and b'HTTP/1.1 200 OK' in answer
    assert toxiproxy('GET', '/proxies/p')[0] == 200                 # not deleted
    toxiproxy('POST', '/proxies/p/toxics', {'type': 'noop'})
    proxy = toxiproxy.server.proxies['p']
    proxy.add_fault('bandwidth', rate=1000)       # a native fault, named as a toxic type
    listed = json.loads(toxiproxy('GET', '/proxies/p/toxics')[2])
    assert [(toxic['name'], toxic['attributes'].get('rate')) for toxic in listed] == [
        ('noop_downstream', None), ('bandwidth', 1000)]
    for body, error in [('{"type": "latency", "attributes": {"latency": 1%s}}' % ('0' * 400),
                         'of type int64'),
                        ('{"type": "latency", "toxicity": 1e39}', 'of type float32')]:
        status, _, text = toxiproxy('POST', '/proxies/p/toxics', body)
        assert status == 400 and error in json.loads(text)['error'], text
    status, _, text = toxiproxy('POST', '/proxies/p/toxics', 'zz\r\n\r\n',
                                headers={'Transfer-Encoding': 'chunked'})
    assert status == 400 and 'bad request body' in text


def test_an_error_answer_and_its_eof_arrive_together(make_proxy, echo_backend):
    """A pooled client that reads the answer must see the EOF with it, or it sends its
    next request on a connection that is ending (redis-py without retries then fails
    with "Connection closed by server" under load)."""
    proxy = make_proxy(echo_backend.address)
    proxy.set_handler('errors', protocol='redis')
    late = 0
    for _ in range(100):
        with connect(proxy.address) as sock:
            sock.sendall(b'*1\r\n$4\r\nPING\r\n')
            answer = b''
            while not answer.endswith(b'\r\n'):
                answer += sock.recv(65536)
            sock.setblocking(False)
            try:
                late += sock.recv(65536) != b''
            except BlockingIOError:      # the EOF is not there yet
                late += 1
    assert answer == b'-ERR Service Unavailable\r\n' and late == 0


def test_start_proxy_serves_toxiproxys_api_when_asked(echo_backend):
    with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                     http_port=0, toxiproxy_api=LOOP + ':0', echo=False) as handle:
        assert handle.toxiproxy and handle.toxiproxy[1]
        conn = http.client.HTTPConnection(*handle.toxiproxy, timeout=WAIT)
        conn.request('POST', '/proxies/default/toxics', json.dumps(
            {'type': 'latency', 'attributes': {'latency': 200}}))
        assert conn.getresponse().read()
        conn.close()
        started = time.monotonic()
        assert round_trip(handle.local) == b'ping' and time.monotonic() - started >= 0.2
        assert handle.client().get_faults()[0]['name'] == 'latency_downstream'
    with start_proxy(distant='%s:%d' % echo_backend.address, local=LOOP + ':0',
                     http_port=0, echo=False) as handle:
        assert handle.toxiproxy is None


# -- what a second review found ------------------------------------------------------

def reply_at_eof(sock):
    """A backend that answers with all it got once it sees the client's EOF."""
    sock.sendall(read_all(sock))
    sock.shutdown(socket.SHUT_WR)


def holding(source, dest, to_backend, name, settings, proxy):
    """A user's fault (blocking) that sleeps, relays data and holds the EOF."""
    data = proxy.get_data(source)
    time.sleep(0.3)
    if data:
        return dest.sendall(data)
    return vaurien.HOLD_EOF


def test_an_eof_held_by_a_blocking_fault_goes_on_when_it_is_removed_or_drawn_out(make_proxy):
    backend = Backend(reply_at_eof)
    try:
        proxy = make_proxy(backend.address, handlers={'holding': holding}, seed=1)
        for change in ('remove', 'toxicity 0'):
            proxy.add_fault('holding', direction='to_backend')
            with connect(proxy.address) as sock:
                sock.sendall(b'hello')
                wait_for(lambda: proxy._live() and proxy._live()[0].backend.delivered,
                         what='hello to pass')
                sock.shutdown(socket.SHUT_WR)
                wait_for(lambda: proxy._live()[0].jobs, what='the EOF to be in the fault')
                if change == 'remove':
                    proxy.remove_fault('holding')      # while its call holds the EOF
                else:
                    proxy.update_fault('holding', toxicity=0)
                assert outcome(sock) == ('eof', b'hello'), change
            proxy.clear_faults()
    finally:
        backend.close()


def test_the_fault_that_closes_ends_the_connection_at_once(make_proxy):
    backend = Backend(lambda sock: sock.sendall(b'x' * 20000) or sock.recv(10))
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('bandwidth', rate=1000, direction='to_client')   # 20 s of data
        proxy.add_fault('limit_data', bytes=10, direction='to_client')
        with connect(proxy.address) as sock:
            started = time.monotonic()
            assert outcome(sock) == ('eof', b'x' * 10)
            assert time.monotonic() - started < 5     # not after the paced data is dropped
    finally:
        backend.close()


def test_a_close_from_another_thread_is_no_faults_close(make_proxy):
    """Connection.close() from a user's thread, while the worker calls a blocking fault,
    is not that fault's: what the layers before it hold goes on, then the EOF."""
    in_gate, gate, received = threading.Event(), threading.Event(), []

    @vaurien.traits(blocking=False)
    def held(source, dest, to_backend, name, settings, proxy):   # A for 1 s, B for 3 s
        data = proxy.get_data(source)
        dest.sendall(data, delay=1.0 if data == b'A' else 3.0)

    def gated(source, dest, to_backend, name, settings, proxy):   # blocking: the worker's
        data = proxy.get_data(source)
        if data:
            in_gate.set()
            gate.wait(WAIT)
        dest.sendall(data)
    backend = Backend(lambda sock: received.append(read_all(sock)))
    try:
        proxy = make_proxy(backend.address, handlers={'held': held, 'gated': gated})
        proxy.add_fault('held', direction='to_backend')
        proxy.add_fault('gated', direction='to_backend')
        with connect(proxy.address) as sock:
            sock.sendall(b'A')
            wait_for(lambda: proxy._live() and proxy._live()[0].backend.staged,
                     what='A held')
            conn, = proxy._live()
            sock.sendall(b'B')
            wait_for(lambda: conn.backend.staged > vaurien.ENTRY_COST + 1, what='B held')
            assert in_gate.wait(WAIT)        # A is in gated's call, B still held before it
            closer = threading.Thread(target=conn.close)
            closer.start()
            closer.join(WAIT)
            gate.set()
            wait_for(lambda: received, what='the EOF at the backend')
        assert received == [b'AB']
    finally:
        gate.set()
        backend.close()


def test_what_a_worker_holds_after_its_handler_closed_leaves_the_eof_clean(make_proxy):
    """A blocking handler ends the connection (False) on its first chunk while the next
    one waits in the worker: that one can never be sent (a closing connection sends
    nothing new), so the backend keeps its clean EOF, however long the worker takes."""
    first_sent, release, seen = threading.Event(), threading.Event(), {}

    def first_only(source, dest, to_backend, name, settings, proxy):   # blocking
        data = proxy.get_data(source)
        if data == b'first':
            first_sent.wait(WAIT)          # 'second' reaches the worker meanwhile
            dest.sendall(data)
            return False
        release.wait(WAIT)
        dest.sendall(data)

    def backend_side(sock):
        seen['data'] = read_all(sock)
        seen['reset'] = reset_seen(sock, vaurien.LINGER + 1.0)
    backend = Backend(backend_side)
    try:
        proxy = make_proxy(backend.address, handlers={'first_only': first_only})
        proxy.set_handler('first_only')
        with connect(proxy.address) as sock:
            sock.sendall(b'first')
            wait_for(lambda: proxy._live() and proxy._live()[0].jobs, what='the first call')
            conn, = proxy._live()
            sock.sendall(b'second')
            wait_for(lambda: conn.jobs == 2, what='the second chunk in the worker')
            first_sent.set()
            wait_for(lambda: 'reset' in seen, WAIT + vaurien.LINGER + 1.0, 'the backend')
            release.set()
        assert seen == {'data': b'first', 'reset': False}
    finally:
        release.set()
        backend.close()


def test_what_a_blocking_fault_holds_when_its_connection_ends_is_cut_with_a_reset(
        make_proxy):
    """A blocking fault's call holds a chunk, in the worker, past the linger of a close:
    that chunk would have gone before the EOF, which waits behind it, so the stream
    is cut, and the backend gets a reset, not an EOF that passes for a whole one."""
    release, seen = threading.Event(), {}

    def slow(source, dest, to_backend, name, settings, proxy):   # blocking
        data = proxy.get_data(source)
        if data:
            release.wait(WAIT)
        dest.sendall(data)
    backend = Backend(lambda sock: seen.update(end=outcome(sock)))
    try:
        proxy = make_proxy(backend.address, handlers={'slow': slow})
        proxy.add_fault('slow', direction='to_backend')
        with connect(proxy.address) as sock:
            sock.sendall(b'payload')
            wait_for(lambda: proxy._live() and proxy._live()[0].backend.held,
                     what='the chunk in the worker')
            conn, = proxy._live()
            threading.Thread(target=conn.close).start()     # a user's close
            wait_for(lambda: 'end' in seen, WAIT + vaurien.LINGER, 'the backend')
            release.set()
        assert seen['end'] == ('rst', b'')
    finally:
        release.set()
        backend.close()


def test_an_error_answer_goes_at_once_while_faults_hold_data(make_proxy):
    backend = Backend(lambda sock: sock.recv(10) and sock.sendall(b'x' * 30000) or
                      sock.recv(10))
    proxy = make_proxy(backend.address)

    def time_to_answer():
        proxy.clear_faults()
        proxy.add_fault('bandwidth', rate=10000, direction='to_client')
        with connect(proxy.address) as sock:
            sock.sendall(b'go')
            read_exactly(sock, 1000)                  # the paced answer is flowing
            proxy.add_fault('errors', protocol='raw', message='E', direction='to_backend')
            started = time.monotonic()
            sock.sendall(b'again')
            answer = b''
            while b'E' not in answer:
                answer += sock.recv(65536)
            return time.monotonic() - started
    try:      # not corked for 200 ms (a corked answer always is; a stall rarely repeats)
        assert any(time_to_answer() < 0.15 for _ in range(3))
    finally:
        backend.close()


def test_toxiproxy_api_deadlines_and_chunked_bodies(toxiproxy, monkeypatch):
    monkeypatch.setattr(vaurien.ToxiproxyHandler, 'timeout', 1)
    with socket.create_connection(toxiproxy.server.server_address, timeout=WAIT) as sock:
        sock.sendall(b'POST /proxies HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n{')
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < 8:
            time.sleep(0.3)                   # a byte now and then: each read is quick
            try:
                sock.sendall(b' ')
                sock.settimeout(0.01)
                closed = sock.recv(1) == b''
            except socket.timeout:
                pass
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 5
    body = json.dumps({'name': 'c', 'upstream': '%s:1' % LOOP, 'listen': LOOP + ':0'}).encode()
    with socket.create_connection(toxiproxy.server.server_address, timeout=WAIT) as sock:
        sock.sendall(b'POST /proxies HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n'
                     b'%x;' % len(body) + b'e' * 80 + b'\r\n' + body + b'\r\n0\r\n'
                     b'X-Trailer: yes\r\n\r\nGET /version HTTP/1.1\r\nHost: a\r\n\r\n')
        answer = b''
        while b'"version"' not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b'HTTP/1.1 201 ') and b'HTTP/1.1 200 OK' in answer


def test_cancelled_timers_do_not_pile_up_in_the_pump(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('timeout', timeout='1h', direction='to_client')   # a timer each
    before = len(proxy.pump.timers)
    for _ in range(700):
        with connect(proxy.address) as sock:
            sock.sendall(b'x')
    wait_for(lambda: proxy.connection_count == 0, what='the connections to end')
    proxy.pump.call(proxy.pump.call_later, 0, lambda: None)     # the heap is looked at
    assert len(proxy.pump.timers) < before + 600   # not one hour-long entry per connection


def test_an_ended_connection_is_freed_without_the_cyclic_gc(make_proxy, echo_backend):
    """It no longer holds its sides in a cycle: freed as it ends, it leaves the cyclic
    collector nothing to do (it took a quarter of the pump's CPU on short connections),
    faults or not, a blocking handler or not (then once its worker is done)."""
    def relay(source, dest, to_backend, name, settings, proxy):
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, handlers={'relay': relay})

    def left():   # a cycle would keep the connection, and its sides and layers, alive
        return [obj for obj in gc.get_objects()
                if isinstance(obj, vaurien.Connection) and obj.proxy is proxy]
    gc.collect()
    gc.disable()
    try:
        for handler, faults in (('normal', ()), ('normal', ('delay',)), ('relay', ())):
            proxy.set_handler(handler)
            for name in faults:
                proxy.add_fault(name, sleep=0)
            for _ in range(20):
                assert round_trip(proxy.address) == b'ping'
            wait_for(lambda: not left(), what='the ended connections to be freed')
    finally:
        gc.enable()


def test_a_late_close_of_an_ended_connection_does_nothing(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    with connect(proxy.address) as sock:
        sock.sendall(b'x')
        assert read_exactly(sock, 1) == b'x'
        conn, = proxy._live()
    wait_for(lambda: conn.released, what='the connection to end')
    proxy.pump.call(conn.close)       # as a name resolved after the end would
    proxy.pump.call(conn.kill)
    assert round_trip(proxy.address) == b'ping'


@pytest.mark.parametrize('api', ['control', 'toxiproxy'])
def test_both_apis_answer_100_continue_before_the_body_comes(make_proxy, echo_backend,
                                                              toxiproxy, api):
    """A client that sends "Expect: 100-continue" waits for it before sending its body."""
    if api == 'control':
        address, path, body = make_proxy(echo_backend.address, http=True).control, \
            '/handler', json.dumps({'name': 'normal'}).encode()
    else:
        address, path, body = toxiproxy.server.server_address, '/populate', b'[]'
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(b'POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\nExpect: 100-continue\r\n\r\n'
                     % (path.encode(), len(body)))
        assert read_exactly(sock, 25) == b'HTTP/1.1 100 Continue\r\n\r\n'
        sock.sendall(body)
        answer = read_exactly(sock, 12)
    assert answer in (b'HTTP/1.1 200', b'HTTP/1.1 201'), answer


def test_a_side_kept_beyond_its_connection_does_nothing_when_called(make_proxy,
                                                                     echo_backend, caplog):
    kept = []

    @vaurien.traits(blocking=False)
    def keep(source, dest, to_backend, name, settings, proxy):
        kept.append((source, dest))
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, behavior='100:keep', handlers={'keep': keep})
    assert round_trip(proxy.address) == b'ping'
    wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    source, dest = kept[0]
    with caplog.at_level(logging.ERROR, logger='vaurien'):
        source.close()
        source.abort()
        dest.shutdown(socket.SHUT_RDWR)
        source.answer_and_close(b'too late')
        dest.sendall(b'too late')
        assert source.connection is None
        assert round_trip(proxy.address) == b'ping'    # the pump went on
    assert not caplog.records


def test_an_event_of_the_round_in_which_its_connection_ended_is_ignored(make_proxy,
                                                                         echo_backend,
                                                                         caplog):
    """A handler disables the proxy (every connection ends) while the other
    connection's chunk waits in the same select() round."""
    @vaurien.traits(blocking=False)
    def down_on_down(source, dest, to_backend, name, settings, proxy):
        data = proxy.get_data(source)
        if data == b'DOWN':
            proxy.disable()
            return False
        dest.sendall(data)
    proxy = make_proxy(echo_backend.address, behavior='100:down',
                       handlers={'down': down_on_down})
    first, second = connect(proxy.address), connect(proxy.address)
    try:
        for sock in (first, second):
            sock.sendall(b'x')
            assert read_exactly(sock, 1) == b'x'
        held = threading.Event()
        proxy.pump.call_soon(held.wait, WAIT)      # both chunks wait for the same round
        with caplog.at_level(logging.ERROR, logger='vaurien'):
            first.sendall(b'DOWN')
            second.sendall(b'more')
            time.sleep(0.1)    # both chunks arrive while the pump is held
            held.set()
            for sock in (first, second):
                assert outcome(sock)[0] in ('eof', 'rst')
            proxy.pump.call(lambda: None)    # after that round
        assert not caplog.records, caplog.text
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------------
# A review of the Python API: forks, threads
# ---------------------------------------------------------------------------

def forked(child):
    """Fork; the child runs `child()` (its answer, bytes, goes back through a pipe) and
    lives until killed.  Returns (pid, a function that reads the answer)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(writer, child())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(writer)

    def answer():
        """What the child wrote, as soon as it did (b'' if it did not within WAIT)."""
        try:
            ready, _, _ = select.select([reader], [], [], WAIT)
            return os.read(reader, 100) if ready else b''
        finally:
            os.close(reader)
    return pid, answer


def reap(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')    # fork() with threads: 3.12
def test_a_forked_child_keeps_none_of_the_proxys_sockets_nor_drives_it(make_proxy,
                                                                        echo_backend):
    proxy = make_proxy(echo_backend.address)
    live = connect(proxy.address)

    def child():
        try:
            proxy.set_handler('delay')
        except vaurien.VaurienError as exc:
            return b'refused' if 'which forked this one' in str(exc) else b'wrong error'
        return b'changed its copy'
    try:
        live.sendall(b'x')
        assert read_exactly(live, 1) == b'x'
        pid, answer = forked(child)
        try:
            assert answer() == b'refused'
            proxy.disable()           # the child lives, and holds no copy of the listener:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(proxy.address, timeout=WAIT)
            assert outcome(live)[0] in ('eof', 'rst')   # ... nor of the relayed sockets
            proxy.enable()            # the port is free to listen on again
            assert round_trip(proxy.address) == b'ping'
        finally:
            reap(pid)
    finally:
        live.close()


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_a_client_used_before_a_fork_gets_its_own_answers_on_both_sides(proxy):
    client = proxy.client()
    client.get_handler()          # its keep-alive connection is open when the fork comes

    def calls(call, key):
        """What goes wrong in 150 calls: an answer that is another call's."""
        for _ in range(150):
            if key not in call():
                return b'crossed'
        return b'fine'
    pid, answer = forked(lambda: calls(client.status, 'enabled'))
    try:
        assert calls(client.get_handler, 'handler') == b'fine'
        assert answer() == b'fine'
    finally:
        reap(pid)


@pytest.mark.parametrize('twice', ['start', 'stop'])
def test_start_and_stop_from_two_threads_at_once(make_proxy, echo_backend, twice):
    def controls():
        return [thread for thread in threading.enumerate() if thread.name == 'vaurien-control']
    before = set(controls())
    for _ in range(5):
        proxy = Proxy('%s:0' % LOOP, echo_backend.address, http=True, http_port=0)
        failed = []

        def run(method):
            try:
                method()
            except Exception as exc:
                failed.append(exc)
        if twice == 'stop':
            proxy.start()
        threads = [threading.Thread(target=run, args=(getattr(proxy, twice),))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        proxy.stop()
        assert not failed, failed
        wait_for(lambda: set(controls()) <= before, what='no control API left serving')


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_a_forked_child_makes_its_own_proxy_whatever_lock_a_thread_held(echo_backend):
    holding, release = threading.Event(), threading.Event()

    def hold():     # the pump records an event: a fork may come meanwhile
        with vaurien.EVENTS.lock:
            holding.set()
            release.wait(WAIT)
    threading.Thread(target=hold, daemon=True).start()
    holding.wait(WAIT)

    def child():
        proxy = Proxy('%s:0' % LOOP, echo_backend.address)
        proxy.set_behavior('100:normal')
        relayed = round_trip(proxy.address) == b'ping'
        proxy.stop()
        return b'served' if relayed else b'not relayed'
    try:
        pid, answer = forked(child)
        try:
            assert answer() == b'served'
        finally:
            reap(pid)
    finally:
        release.set()


def test_a_handler_may_stop_its_proxy_while_a_test_stops_it_too(make_proxy, echo_backend):
    entered = threading.Event()

    @vaurien.traits(blocking=False)
    def stopper(source, dest, to_backend, name, settings, proxy):
        entered.set()
        time.sleep(0.2)    # meanwhile the teardown's stop() begins
        proxy.stop()
    proxy = make_proxy(echo_backend.address, behavior='100:stopper',
                       handlers={'stopper': stopper})
    with connect(proxy.address) as sock:
        sock.sendall(b'x')
        assert entered.wait(WAIT)
        teardown = threading.Thread(target=proxy.stop, daemon=True)
        teardown.start()
        teardown.join(WAIT)
        assert not teardown.is_alive()
    proxy.pump.call(lambda: None)     # the pump goes on


def test_a_dest_kept_beyond_its_connection_does_nothing_through_a_fault(make_proxy,
                                                                         echo_backend, caplog):
    kept = []

    @vaurien.traits(blocking=False)
    def keeper(source, dest, to_backend, name, settings, proxy):
        kept.append(dest)
        dest.sendall(proxy.get_data(source))
    proxy = make_proxy(echo_backend.address, behavior='100:keeper',
                       handlers={'keeper': keeper})
    proxy.add_fault('limit_data', bytes=100000, direction='both')
    with connect(proxy.address) as sock:
        sock.sendall(b'x')
        assert read_exactly(sock, 1) == b'x'
        proxy.disable()          # ended at once, not closing first
    wait_for(lambda: proxy.connection_count == 0, what='the connection to end')
    with caplog.at_level(logging.WARNING, logger='vaurien'):
        for dest in kept:
            dest.sendall(b'late')
        proxy.pump.call(lambda: None)     # after what was handed over
    assert not caplog.records, caplog.text


def test_a_changed_slow_close_keeps_its_close_waiting(make_proxy):
    def serve(sock):
        sock.sendall(b'bye')     # and closes
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('slow_close', delay=60)
        with connect(proxy.address) as sock:
            assert read_exactly(sock, 3) == b'bye'
            proxy.update_fault('slow_close', delay=30)      # data goes at once; a close no
            assert outcome(sock, 0.5) == ('open', b'')
    finally:
        backend.close()


@pytest.mark.parametrize('stream', ['upstream', 'downstream'])
def test_a_timeout_that_closes_on_an_eof_sends_it_at_once(make_proxy, monkeypatch, stream):
    monkeypatch.setattr(vaurien, 'LINGER', 60)     # no end comes from the linger time
    ended = []

    def serve(sock):        # closes at once (downstream), or says when the client's EOF came
        if stream == 'upstream':
            ended.append(outcome(sock)[0])
    backend = Backend(serve)
    try:
        proxy = make_proxy(backend.address)
        proxy.add_fault('timeout', timeout=60, client_eof='close', backend_eof='close',
                        direction='to_backend' if stream == 'upstream' else 'to_client')
        with connect(proxy.address) as sock:
            if stream == 'upstream':
                sock.shutdown(socket.SHUT_WR)
                wait_for(lambda: ended, what='the backend to see the EOF')
                assert ended == ['eof']
            assert outcome(sock)[0] == 'eof'
    finally:
        backend.close()


def test_a_timeout_fault_laid_on_an_idle_connection_closes_it_in_its_time(make_proxy,
                                                                          echo_backend):
    proxy = make_proxy(echo_backend.address)
    with connect(proxy.address) as pooled:      # idle, as a pool's connection is
        pooled.sendall(b'x')
        assert read_exactly(pooled, 1) == b'x'
        started = time.monotonic()
        proxy.add_fault('timeout', timeout=0.3)           # as Toxiproxy: the clock starts now
        assert outcome(pooled)[0] == 'eof' and time.monotonic() - started >= 0.3


def test_a_changed_timeout_starts_a_new_clock(make_proxy, echo_backend):
    proxy = make_proxy(echo_backend.address)
    proxy.add_fault('timeout', timeout=1)
    with connect(proxy.address) as sock:
        proxy.update_fault('timeout', timeout=60)         # the 1 s clock no longer counts
        assert outcome(sock, 1.5) == ('open', b'')
        proxy.update_fault('timeout', timeout=0.2)
        assert outcome(sock)[0] == 'eof'
