"""Vaurien, the Chaos TCP proxy.

Vaurien sits between an application and a backend (MySQL, PostgreSQL, Redis,
memcached, an HTTP API...) and, on demand, delays, breaks, hangs, cuts or
corrupts the traffic, so that automated tests can prove that the application
survives the failures that otherwise surface only in production.

The whole product is this one standard-library module: copy it, vendor it, run
it with ``python vaurien.py`` or ``python -m vaurien``.

How it is built (each role is a class or a function below, in this order):

- Settings: handler settings are documented in the handler's docstring, under
  a ``Settings:`` line, one ``name (type, default X): help`` line each.  That
  docstring is parsed once into a schema which types and validates every value,
  whether it comes from an ini file (strings), the control API (JSON) or a
  Python call (keywords), at the moment it is set.  Times (type seconds)
  and sizes (bytes, rate) take units: 500ms, 100kB/s.
- Handlers: plain functions ``handler(source, dest, to_backend, name,
  settings, proxy)`` called each time ``source`` has data or EOF.
  ``proxy.get_data(source)`` returns that data (``b''`` at EOF).  Handlers
  write with ``dest.sendall(data, delay=0)``, which never blocks.  Returning
  ``False`` ends the connection; returning ``HOLD_EOF`` keeps the pump from
  relaying an EOF; anything else goes on.  A handler may carry traits, set
  with ``@traits``: ``backend`` (whether to connect to the backend for it),
  ``on_connect`` and ``on_close`` hooks, a ``check`` of its settings, and
  ``blocking`` (False: it never waits, so the pump may call it).
- Behavior: a mix like ``20:delay,10:errors``; every new connection draws one
  handler from it, in accept order, and keeps it.  A handler set through the
  control API overrides the mix, for every connection, live ones included,
  from their next chunk on.
- Faults (``Fault``): a stack of them on top of the handler or mix, each a
  handler with its settings, a direction and a toxicity (drawn per
  connection).  Each way, a connection with faults has a chain of
  ``Layer``s between the handler in force and the socket: each layer is
  the `dest` of its fault's handler and holds what that handler delays, so
  a delay in one layer delays what the next ones see (as Toxiproxy's toxic
  chain).  Faults come and go on live connections without losing or
  reordering a byte.
- The pump (``Pump``, ``Connection``, ``Side``): one selector loop, in one
  thread, serves every connection of every Proxy in the process: it accepts,
  connects to backends without blocking (the connect timeout is a timer; a
  host name is resolved in a thread), reads, calls the handlers, flushes the
  queued writes and runs the timers.  Writes are queued on the destination
  ``Side`` (with an optional due time) and flushed when its socket is
  writable, so neither direction ever waits on the other.  A direction stops
  reading while its destination holds more than ``HIGH_WATER`` bytes: memory
  stays bounded when a peer stops reading.  EOF is relayed as
  ``shutdown(SHUT_WR)`` (half-close), after the data before it; a reset is
  relayed as a reset (one that follows a socket's EOF, which the selector no
  longer watches, is looked for every second).  A handler not marked
  non-blocking (a user's, which may sleep) runs in a thread of its connection
  (``_Worker``), one call at a time; its writes come back to the pump in
  order, so a sleep holds that connection only.  Out of descriptors, the pump
  resets the excess connections at once (a spare descriptor lets it accept
  them).  A steady connection under ``normal`` is read the quick way: its
  socket's selector callback reads a chunk and hands it on at once (sends it
  to the other socket itself, or gives it to the first fault layer or to
  ``sendall``, which queues behind what waits), until a handler is set or the
  connection is touched (see ``Side._read_quickly``).
- ``Proxy``: a ``socketserver.ThreadingTCPServer`` whose listener the pump
  watches; it accepts through ``get_request``, ``verify_request`` and
  ``process_request``, which draws the handler and opens a ``Connection``.
  It relays from its creation (``start()`` adds the control API).  It also
  owns the handler registry (the built-ins, plus ``register()``'s), the
  behavior, the listener (closed to refuse connections) and the optional
  control API.
- ``ControlServer``: an ``http.server`` thread serving the JSON control API.
- ``ToxiproxyServer``: Toxiproxy's HTTP API, as Toxiproxy 2.12 answers it,
  so that its clients drive Vaurien: its toxics are stacked faults
  (``TOXICS`` maps their types and units onto handlers).
- ``Client``, ``start_proxy`` (whose ``ProxyProcess`` is the child's pid,
  and knows where it listens), ``stop_proxy``: drive a proxy from tests.
- Configuration and command line: the ini file, ``main()``, ``--demo``.
- The pytest plugin (``pytest -p vaurien``): the fixtures ``vaurien_proxy``
  and ``vaurien_process``, made only when pytest loads the module.
"""

import argparse
import collections
import configparser
import contextlib
import difflib
import errno
import fractions
import functools
import heapq
import hmac
import http.client
import http.server
import importlib
import importlib.util
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import select
import selectors
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
import weakref
import _thread

__version__ = '3.1.0'
__all__ = ['Proxy', 'Client', 'start_proxy', 'stop_proxy', 'traits', 'directional',
           'HOLD_EOF', 'VaurienError', 'ConfigError', 'ToxiproxyServer', 'main']

log = logging.getLogger('vaurien')

#: Return this from a handler to keep the pump from relaying an EOF.
HOLD_EOF = 'hold-eof'

FIRST_BYTES = 256        # bytes of a connection kept to tell its protocol
CHUNK = 65536            # bytes read at once from a socket, at first
MAX_CHUNK = 1 << 20      # ... and at most, while reads keep filling the chunk
HIGH_WATER = 1 << 20     # bytes queued for a side before its peer stops being read
ENTRY_COST = 128         # bytes a queued chunk costs beyond its data: 1-byte chunks count
LINGER = 1.0             # seconds a closing connection waits for the peer's EOF
MAX_DRAIN = 60.0         # ... while the peer keeps sending: at most this long
PROBE_EVERY = 1.0        # seconds between looks at sockets whose EOF was read, for a reset
CONNECT_TIMEOUT = 5.0    # seconds to connect to the backend
MAX_BODY = 64 * 1024     # bytes, largest control API request body
SLOW_CALL = 0.05         # seconds a handler call may hold the pump before a warning
RESOLVE_TTL = 5.0        # seconds a backend's resolved addresses are reused


class VaurienError(Exception):
    """A control API call failed, or a proxy could not be started."""


class ConfigError(VaurienError):
    """A user mistake in a setting, a behavior, an option or a config file."""

    status = 400     # the control API's answer to it


class FaultNotFound(ConfigError):
    """No fault of that name on the proxy."""

    status = 404


class FaultExists(ConfigError):
    """A fault of that name is on the proxy already."""

    status = 409


# ---------------------------------------------------------------------------
# Settings: typed, validated, documented in the handler's docstring
# ---------------------------------------------------------------------------

_SETTING_LINE = re.compile(
    r'^\s*(?P<name>[a-z_][a-z0-9_]*) \((?P<type>[^,]+), default (?P<default>.*?)\):'
    r'\s*(?P<help>.*)$')
_BOUNDS = re.compile(r'^(?P<type>int|float|seconds|bytes|rate)'
                     r'(?: (?P<low>[-\d.]+)\.\.(?P<high>[-\d.]+)| >= (?P<min>[-\d.]+))?$')
_QUANTITY = re.compile(r'^(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*'
                       r'(?P<unit>[a-zA-Z]*)(?P<per_second>/s)?$')
#: The units a setting of type seconds or bytes may be written with (any case).
UNITS = {
    'seconds': {'': 1, 's': 1, 'us': 1e-6, 'ms': 1e-3, 'm': 60, 'min': 60, 'h': 3600},
    'bytes': {'': 1, 'b': 1, 'kb': 10 ** 3, 'mb': 10 ** 6, 'gb': 10 ** 9,
              'kib': 1 << 10, 'mib': 1 << 20, 'gib': 1 << 30},
}
UNITS['rate'] = UNITS['bytes']     # bytes per second, "/s" allowed
_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def parse_value(text):
    """Type a value from an ini file or a command line: int, float, bool, else str.

    Numbers are ASCII: int() would also read other scripts' digits and "1_0".
    """
    for kind in (int, float) if text.isascii() and '_' not in text else ():
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    return text


class Setting:
    """One documented setting of a handler: its type, bounds, default and help."""

    def __init__(self, name, kind, default, help):
        self.name, self.help = name, help
        self.low = self.high = None
        self.choices = None
        bounds = _BOUNDS.match(kind)
        if bounds:
            self.type = bounds['type']
            if bounds['min'] is not None:
                self.low = float(bounds['min'])
            elif bounds['low'] is not None:
                self.low, self.high = float(bounds['low']), float(bounds['high'])
        elif '|' in kind:
            self.type, self.choices = 'choice', kind.split('|')
        else:
            self.type = kind
        if self.type not in ('int', 'float', 'seconds', 'bytes', 'rate', 'bool', 'str',
                             'choice', 'address'):
            raise ValueError('setting %s: unknown type %r' % (name, kind))
        self.kind = kind
        self.default = None if default == 'none' else self.convert(default)

    def convert(self, value):
        """Return `value` typed and checked, or raise ValueError saying why."""
        wanted = 'expected %s' % self.kind
        if self.type in UNITS:
            wanted += ' (%s)' % _UNIT_HELP[self.type]
        if self.type in ('int', 'float') or self.type in UNITS:
            try:
                return self._number(value)
            except (OverflowError, ValueError):
                raise ValueError(wanted) from None
        if self.type == 'bool':
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            if not isinstance(value, int) or value not in (0, 1):   # True, 1, False, 0
                raise ValueError(wanted)
            return bool(value)
        if not isinstance(value, str):
            raise ValueError('expected a string' if self.type == 'str' else wanted)
        try:
            value.encode()     # it is sent, or logged: a lone surrogate fails there
        except UnicodeEncodeError:
            raise ValueError('expected text UTF-8 can encode (no lone surrogate)') from None
        if self.choices:     # in any case: DEBUG, To_Backend
            by_case = {choice.lower(): choice for choice in self.choices}
            if value.strip().lower() not in by_case:
                raise ValueError('expected one of ' + ', '.join(self.choices))
            value = by_case[value.strip().lower()]
        if self.type == 'address':
            try:
                parse_address(value)
            except ConfigError:
                raise ValueError('expected HOST:PORT, like localhost:8000') from None
        return value

    def _number(self, value):
        if isinstance(value, str):
            value = parse_quantity(value, self.type) if self.type in UNITS \
                else parse_value(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError
        typed = float(value) if self.type in ('float', 'seconds') else int(value)
        if typed != value or (self.low is not None and typed < self.low) \
                or (self.high is not None and typed > self.high):
            raise ValueError
        return typed

    def describe(self):
        return '%s (%s, default %s): %s' % (self.name, self.kind, self.default, self.help)


_UNIT_HELP = {'seconds': 'seconds, or with a unit: 500ms, 2s, 1.5m, 1h',
              'bytes': 'a whole number of bytes, or with a unit: 100KB, 64KiB, 1MB, 1MiB',
              'rate': 'bytes per second, or with a unit: 100KB, 100kB/s, 1MiB/s'}


UNITS_NOTE = ('\nUnits: a setting of type seconds takes a bare number of seconds, or 500ms, 2s, '
              '1.5m, 1h (also us); one of type bytes a whole number of bytes, or 100KB (kB, '
              'KB: 1000 bytes), 64KiB (1024), 1MB, 1MiB, 1GB, 1GiB; one of type rate bytes '
              'per second, the same way, with /s allowed: 100kB/s.  A lower-case b is bits: '
              'refused.')


def parse_quantity(text, kind):
    """A number of seconds, bytes or bytes per second, written bare or with a unit:
    '500ms', '64KiB', '100kB/s'.

    Raises ValueError for anything else: a fraction of a byte, bits ('Mb': a
    lower-case b), "/s" on what is no rate.
    """
    match = _QUANTITY.match(text.strip()) if text.isascii() else None
    if match is None or (match['per_second'] and kind != 'rate') or \
            match['unit'].endswith('b'):
        raise ValueError
    factor = UNITS[kind].get(match['unit'].lower())
    if factor is None:
        raise ValueError
    if kind == 'seconds':
        return float(match['number']) * factor
    number = fractions.Fraction(match['number']) * factor   # exact: bytes are whole
    if number.denominator != 1:
        raise ValueError
    return int(number)


def parse_settings_doc(doc):
    """Read the ``Settings:`` block of a handler docstring into {name: Setting}.

    ``Settings: none.`` gives {}; no such line gives None (any setting goes).
    """
    schema = {}
    lines = [line.strip() for line in (doc or '').splitlines()]
    if 'Settings: none.' in lines:
        return schema
    if 'Settings:' not in lines:
        return None
    for line in lines[lines.index('Settings:') + 1:]:
        match = _SETTING_LINE.match(line)
        if match:
            schema[match['name']] = Setting(match['name'], match['type'].strip(),
                                            match['default'], match['help'])
        elif line and schema:
            last = schema[list(schema)[-1]]
            last.help += ' ' + line
        elif line:
            raise ValueError('its "Settings:" block starts with %r, not with '
                             '"name (type, default X): help"' % line)
    if not schema:
        raise ValueError('its "Settings:" block lists no setting (write "Settings: none.")')
    return schema


def _settings_text(settings):
    """'sleep=0.5, jitter=0': settings as a log line shows them."""
    return ', '.join('%s=%s' % item for item in settings.items()) or 'no settings'


_GOOD_NAME = 'text without "/", a control character, a line break or a lone surrogate'


def _good_name(name):
    """Whether `name` may name a fault or a proxy: it goes in URLs, log lines and
    metrics, in UTF-8 (a format character, as an emoji's joiner, is fine)."""
    return isinstance(name, str) and name != '' and '/' not in name and not any(
        unicodedata.category(char) in ('Cc', 'Cs', 'Zl', 'Zp') for char in name)


def shown(value):
    """A value as an error message shows it: as is, unless that would break the line."""
    return value if isinstance(value, str) and value.isprintable() else repr(value)


def _number(value):
    """20 for 20.0, 2.5 for 2.5: percentages as people write them."""
    return '%d' % value if value == int(value) else repr(value)


def summary_of(func):
    """The first paragraph of a function's docstring, on one line (a Settings: block
    right under it is no part of it)."""
    paragraph = inspect.cleandoc(func.__doc__ or '').split('\n\n')[0]
    return ' '.join(paragraph.split('\nSettings:')[0].split())


def applies(direction, to_backend):
    """True when a handler set for `direction` acts on this chunk."""
    return direction == 'both' or (direction == 'to_backend') == to_backend


def directional(func):
    """Make a handler act on the traffic of its `direction` setting only.

    Chunks going the other way are relayed unchanged, as `normal` does.
    """
    @functools.wraps(func)
    def handler(source, dest, to_backend, name, settings, proxy):
        if applies(settings['direction'], to_backend):
            return func(source, dest, to_backend, name, settings, proxy)
        return normal(source, dest, to_backend, name, settings, proxy)
    # What a fault calls (its layers are in its direction only), for this very wrapper:
    # a user's functools.wraps around it copies the attribute, and must be called.
    handler.vaurien_undirected = (handler, func)
    return handler


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------

def traits(backend=True, on_connect=None, on_close=None, check=None, blocking=True,
           on_live=None):
    """Decorate a handler with how connections that open under it start, and where it runs.

    backend: when False, the proxy does not connect to the backend for a
      connection that opens under this handler (it still connects later, on
      the first byte a handler sends there); or ``backend(connection,
      settings)``, deciding for each connection after `on_connect`.
    on_connect: ``on_connect(client, backend, name, settings, proxy)`` is
      called when a connection opens under this handler, before any data;
      it may answer (a greeting) and returns False to end the connection.
    on_close: ``on_close(connection, name, proxy)`` is called once when a
      connection this handler was called for ends, however it ends.
    on_live: ``on_live(client, backend, name, settings, proxy)`` is called
      when this handler, as a fault, is laid on a connection already open,
      or changed while it is (timeout's clock starts then, as Toxiproxy's).
    check: ``check(settings)`` raises ValueError when settings that are each
      valid do not go together; called whenever the settings are set.
    blocking: False promises that the handler and its hooks never wait (no
      sleep, no blocking I/O: delays go through ``sendall(delay=)``), so the
      pump calls them in its own thread, at full speed.  Otherwise (and for
      any handler without traits) they run in a thread of the connection,
      one call at a time, and a sleep holds up that connection only.
    """
    def mark(func):
        func.blocking = blocking
        func.backend = backend
        func.on_connect = on_connect
        func.on_close = on_close
        func.on_live = on_live
        func.check = check
        return func
    return mark


def normal(source, dest, to_backend, name, settings, proxy):
    """Transparent: relays every byte both ways, unchanged.

    Settings: none.
    """
    dest.sendall(proxy.get_data(source))


@directional
def delay(source, dest, to_backend, name, settings, proxy):
    """Delays each chunk by `sleep` seconds from its arrival, keeping order.

    A stream of chunks is shifted in time, not slowed to one chunk per delay,
    and the other direction keeps flowing meanwhile.

    Settings:
      sleep (seconds >= 0, default 1): seconds each chunk is held.
      jitter (seconds >= 0, default 0): up to this many seconds more or less, drawn per chunk.
      direction (to_backend|to_client|both, default to_backend): the traffic delayed.
    """
    data = proxy.get_data(source)
    wait = settings['sleep']
    if settings['jitter']:
        wait = max(0.0, wait + source.connection.random.uniform(
            -settings['jitter'], settings['jitter']))
    dest.sendall(data, delay=wait)


# -- errors: protocol-aware error answers ------------------------------------

_HTTP_METHODS = (b'GET ', b'HEAD ', b'POST ', b'PUT ', b'DELETE ', b'OPTIONS ', b'PATCH ',
                 b'TRACE ', b'CONNECT ')
_HTTP_REQUEST_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[0-9]\r?$")
_MEMCACHE_WORDS = frozenset(
    b'get gets gat gats set add replace append prepend cas delete incr decr touch '
    b'stats version flush_all verbosity quit mg ms md ma mn me'.split())
_PG_SSL_REQUEST = 80877103
_PG_GSS_REQUEST = 80877104
_PG_PROTOCOL_3 = 196608
_PG_ENCRYPTION_REQUESTS = (struct.pack('!I', _PG_SSL_REQUEST), struct.pack('!I', _PG_GSS_REQUEST))
MAX_FIRST_LINE = 8192    # bytes `errors` waits for, at most, to see a client's first line
FIRST_LINE_WAIT = 0.5    # ... and seconds


def detect_protocol(data, final=True):
    """Guess the protocol from a client's first bytes; None: wait for more.

    PostgreSQL by its startup or SSL request packet (8 bytes); then, from the
    first line: HTTP by a request line (``METHOD target HTTP/1.x``, any
    method); Redis by a RESP array (``*``) or an upper-case inline command;
    memcached by a lower-case command word (``get foo`` is memcached: Redis
    clients send RESP arrays, memcached commands are lower case); else raw.
    MySQL and SMTP clients say nothing first: their servers' greetings tell
    them (`detect_greeting`).  Unless `final` (EOF, or MAX_FIRST_LINE bytes),
    a first line or packet cut short gives None.
    """
    final = final or len(data) >= MAX_FIRST_LINE
    if data.startswith(_HTTP_METHODS):
        return 'http'
    if len(data) >= 8:
        length, code = struct.unpack('!II', data[:8])
        if code in (_PG_SSL_REQUEST, _PG_GSS_REQUEST, _PG_PROTOCOL_3) and length >= 8:
            return 'postgresql'
    elif data.startswith(b'\x00') and not final:
        return None
    end = data.find(b'\n')
    if end < 0 and not final:
        return None
    line = data if end < 0 else data[:end]
    if _HTTP_REQUEST_LINE.match(line):
        return 'http'
    if line.startswith(b'*'):
        return 'redis'
    word = line.split(None, 1)[0] if line.strip() else b''
    if word in _MEMCACHE_WORDS:
        return 'memcache'
    if word.isalpha() and word.isupper():
        return 'redis'
    return 'raw'


def detect_greeting(data):
    """The protocol of a server that speaks first, from its greeting: mysql, smtp or None."""
    if len(data) >= 5 and data[3] == 0 and data[4] == 10:   # packet 0, protocol version 10
        return 'mysql'
    if data.startswith((b'220 ', b'220-')):
        return 'smtp'
    return None


def http_error(status, message):
    """A complete HTTP/1.1 error response that closes the connection."""
    reason = http.client.responses.get(status, 'Error')
    body = ((message or reason) + '\n').encode()
    return ('HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n'
            'Content-Length: %d\r\nConnection: close\r\n\r\n'
            % (status, reason, len(body))).encode() + body


def mysql_error(code, message, request=b''):
    """A MySQL ERR packet: in place of the greeting (no SQLSTATE), or answering
    the client packet `request` (numbered after it, with a SQLSTATE)."""
    payload = b'\xff' + struct.pack('<H', code)
    if len(request) >= 4:
        payload += b'#HY000'
    payload += message.encode()
    sequence = (request[3] + 1) % 256 if len(request) >= 4 else 0
    return struct.pack('<I', len(payload))[:3] + bytes([sequence]) + payload


def postgresql_error(code, message):
    """A PostgreSQL FATAL ErrorResponse."""
    fields = b''.join(kind + text.encode() + b'\x00' for kind, text in (
        (b'S', 'FATAL'), (b'V', 'FATAL'), (b'C', code), (b'M', message)))
    return b'E' + struct.pack('!I', len(fields) + 5) + fields + b'\x00'


_ERROR_DEFAULTS = {  # protocol: (code, message)
    'redis': ('', 'ERR Service Unavailable'),
    'memcache': ('', 'Service Unavailable'),
    'mysql': ('1040', 'Too many connections'),
    'postgresql': ('53300', 'sorry, too many clients already'),
    'smtp': ('421', '4.3.2 Service not available, closing transmission channel'),
    'raw': ('', ''),
}


def error_answer(protocol, settings, rng, request=b''):
    """The bytes `errors` answers with, for `protocol`, to `request` (b'': a greeting)."""
    if protocol == 'http':
        return http_error(settings['status'], settings['message'])
    code, message = _ERROR_DEFAULTS[protocol]
    code, message = settings['code'] or code, settings['message'] or message
    if protocol == 'redis':
        return b'-' + message.encode() + b'\r\n'
    if protocol == 'memcache':
        return b'SERVER_ERROR ' + message.encode() + b'\r\n'
    if protocol == 'mysql':   # a code set for another protocol (transient): MySQL's own
        return mysql_error(int(code) if _is_mysql_code(code) else 1040, message, request)
    if protocol == 'postgresql':
        return postgresql_error(code, message)
    if protocol == 'smtp':
        return ('%s %s\r\n' % (code, message)).encode()
    if message or not settings['size']:
        return message.encode()
    return rng.getrandbits(8 * settings['size']).to_bytes(settings['size'], 'big')


def _errors_greeting(client, backend, name, settings, proxy):
    """Servers that speak first (MySQL, SMTP) get their error as the greeting."""
    if settings['protocol'] in ('mysql', 'smtp'):
        client.answer_and_close(error_answer(settings['protocol'], settings,
                                             client.connection.random))
        return False


def _is_mysql_code(code):
    return code.isascii() and code.isdigit() and int(code) < 65536


#: protocol: (whether a `code` setting is one of its error codes, what one is)
ERROR_CODES = {
    'mysql': (_is_mysql_code, 'a MySQL error number is an integer below 65536'),
    'postgresql': (lambda code: re.fullmatch('[0-9A-Z]{5}', code),
                   'a PostgreSQL SQLSTATE is 5 digits or capital letters, like 53300'),
    'smtp': (lambda code: re.fullmatch('[45][0-9]{2}', code),
             'an SMTP error reply code is 3 digits, the first 4 or 5, like 421'),
}


def _check_error_code(settings):
    valid, what = ERROR_CODES.get(settings['protocol'], (None, None))
    if valid and settings['code'] and not valid(settings['code']):
        raise ValueError('code %r: %s' % (settings['code'], what))


@traits(backend=False, on_connect=_errors_greeting, check=_check_error_code)
def errors(source, dest, to_backend, name, settings, proxy):
    """Reads the request, forwards nothing, answers with a protocol error, closes.

    With protocol auto, the client's first line (or packet) tells HTTP (any
    method), PostgreSQL, Redis and memcached apart, else raw; a line cut
    short is waited for, up to 8 KiB or half a second.  A connection open
    before `errors` was set answers in the protocol its first bytes showed,
    including MySQL and SMTP, known by their servers' greetings.  A new
    connection to a MySQL or SMTP server says nothing first: name the
    protocol, and it gets the error as the greeting, without the backend.
    http: a complete HTTP/1.1 response with `status`, Content-Length and
    Connection: close.  redis: ``-ERR ...``.  memcache: ``SERVER_ERROR ...``.
    mysql: an ERR packet, 1040 Too many connections (a `code` that is no
    MySQL number, set for another protocol, gives 1040).  postgresql: answers
    an SSLRequest with N, then a FATAL ErrorResponse, SQLSTATE 53300.
    smtp: a 421 reply.  raw: `message`, or `size` random bytes.  A client
    still sending is read until it stops, so it gets the answer.

    Settings:
      protocol (auto|http|redis|memcache|mysql|postgresql|smtp|raw, default auto): the protocol answered.
      status (int 100..599, default 503): HTTP status code.
      message (str, default ): error text; empty for the protocol's usual one.
      code (str, default ): MySQL error number, PostgreSQL SQLSTATE or SMTP reply code; empty for the default.
      size (bytes 0..1048576, default 64): random bytes answered for raw, when `message` is empty.
    """
    data = proxy.get_data(source)
    if not to_backend:
        return HOLD_EOF  # whatever the backend says is dropped
    state = source.connection.state((name, source.connection.epoch))   # set again: anew
    data = state.pop('start', b'') + data
    if not data:
        return False
    return _answer_error(source, state, data, settings, final=source.eof_read)


def _answer_error(source, state, data, settings, final):
    """Answer `data` with the error of its protocol; or, the first line or packet cut
    short, keep it and wait for more, FIRST_LINE_WAIT seconds at most."""
    protocol = settings['protocol']
    conn = source.connection
    if protocol == 'auto':   # what the connection showed before, else this request
        protocol = conn.protocol() or detect_protocol(data, final=final)
        if protocol is None:
            state['start'] = data
            if not state.get('waiting'):
                state['waiting'] = True
                conn.call_later(FIRST_LINE_WAIT, lambda: 'start' in state and _answer_error(
                    source, state, state.pop('start'), settings, final=True))
            return None
    if protocol == 'postgresql' and data[4:8] in _PG_ENCRYPTION_REQUESTS:
        source.sendall(b'N')  # no TLS: the client goes on with its StartupMessage
        return None
    source.answer_and_close(error_answer(protocol, settings, conn.random, data))
    return None


@traits(backend=False)
def hang(source, dest, to_backend, name, settings, proxy):
    """Reads and discards what arrives, never answers; ends when the client leaves.

    Settings: none.
    """
    if proxy.get_data(source):
        return None
    return False if to_backend else HOLD_EOF


def _close_now(client, backend, name, settings, proxy):
    return False


@traits(backend=False, on_connect=_close_now)
def blackout(source, dest, to_backend, name, settings, proxy):
    """Closes the connection at once; nothing reaches the backend.

    Settings: none.
    """
    return False


def _abort_at_connect(client, backend, name, settings, proxy):
    if settings['when'] == 'connect':
        client.abort()
        return False


@traits(on_connect=_abort_at_connect)
def abort(source, dest, to_backend, name, settings, proxy):
    """Resets the client's connection (RST): it sees "connection reset by peer".

    request: the client's first chunk is forwarded to the backend, then the
    client is reset, so it never gets the reply.  response: the request goes
    through and the reply is replaced by the reset.  connect: the connection
    is reset as soon as it is accepted.

    Settings:
      when (request|response|connect, default request): the moment of the reset.
    """
    data = proxy.get_data(source)
    if to_backend:
        dest.sendall(data)
        if settings['when'] == 'response':
            return None
    (source if to_backend else dest).abort()
    return False


@directional
def bandwidth(source, dest, to_backend, name, settings, proxy):
    """Limits the throughput to `rate` bytes per second, smoothly.

    Data goes out in pieces of a tenth of a second of traffic at most.

    Settings:
      rate (rate >= 1, default 10240): bytes per second.
      direction (to_backend|to_client|both, default to_client): the traffic limited.
    """
    rate = settings['rate']
    step = max(1, rate // 10)

    def pace(available):
        size = min(step, available)
        return size, size / rate
    dest.sendall(proxy.get_data(source), pace=pace)


@directional
def slicer(source, dest, to_backend, name, settings, proxy):
    """Splits data into small pieces sent apart; every byte arrives, in order.

    Settings:
      size (bytes >= 1, default 64): average bytes per piece.
      variation (bytes >= 0, default 0): pieces are `size` plus or minus up to this many bytes.
      delay (seconds >= 0, default 0.001): seconds between pieces.
      direction (to_backend|to_client|both, default to_client): the traffic sliced.
    """
    rng, size, spread = source.connection.random, settings['size'], settings['variation']
    dest.sendall(proxy.get_data(source), pace=lambda available: (
        max(1, size + rng.randint(-spread, spread)), settings['delay']))


def slow_close(source, dest, to_backend, name, settings, proxy):
    """Relays normally, but holds each close (EOF) back for `delay` seconds.

    Settings:
      delay (seconds >= 0, default 1): seconds the close waits.
    """
    data = proxy.get_data(source)
    if data:
        dest.sendall(data)
    else:
        dest.shutdown(delay=settings['delay'])


def _start_timeout(client, backend, name, settings, proxy):
    """Arm the connection's timeout once, whichever handler event comes first; set
    again (a new epoch), a new clock replaces the one running."""
    conn = client.connection
    epoch = conn.epoch
    state = conn.state((name, epoch))
    if not state and settings['timeout'] > 0:
        state['armed'] = True

        def expire():
            if conn.epoch == epoch:
                conn.close()
        conn.call_later(settings['timeout'], expire)


@traits(on_connect=_start_timeout, on_live=_start_timeout)
def timeout(source, dest, to_backend, name, settings, proxy):
    """Swallows data (and EOF) and closes the connection after `timeout` seconds.

    The clock starts when the connection opens; as a fault laid or changed
    while the connection is open, then; as a handler set while it is open,
    when the handler first sees it.  An EOF it
    swallows is held (a client that half-closed still waits, as it would for
    a server that hangs), or closes the connection at once with client_eof
    or backend_eof close (as Toxiproxy's timeout toxic does).

    Settings:
      timeout (seconds >= 0, default 1): seconds until the close; 0 never closes.
      direction (to_backend|to_client|both, default both): the traffic swallowed.
      client_eof (hold|close, default hold): what the client's EOF does.
      backend_eof (hold|close, default hold): what the backend's EOF does.
    """
    client, backend = (source, dest) if to_backend else (dest, source)
    _start_timeout(client, backend, name, settings, proxy)
    data = proxy.get_data(source)
    if not applies(settings['direction'], to_backend):
        return dest.sendall(data)
    if not data and settings['client_eof' if to_backend else 'backend_eof'] == 'close':
        return False
    return HOLD_EOF


@directional
def limit_data(source, dest, to_backend, name, settings, proxy):
    """Relays `bytes` bytes in the given direction, then closes the connection.

    Settings:
      bytes (bytes >= 0, default 1024): bytes relayed before the close.
      direction (to_backend|to_client|both, default to_client): the traffic counted.
    """
    data = proxy.get_data(source)
    state = source.connection.state((name, to_backend))
    room = settings['bytes'] - state.get('sent', 0)
    dest.sendall(data[:room])
    state['sent'] = state.get('sent', 0) + min(room, len(data))
    if len(data) >= room:
        return False


@directional
def reset_peer(source, dest, to_backend, name, settings, proxy):
    """Resets both ends (RST) `timeout` seconds after the first data (or EOF) of
    `direction`, which is dropped, with all that follows; as Toxiproxy's reset_peer.

    Settings:
      timeout (seconds >= 0, default 0): seconds between the first data and the resets.
      direction (to_backend|to_client|both, default to_backend): the traffic that sets it off.
    """
    proxy.get_data(source)
    state = source.connection.state((name, 'reset_peer'))
    if not state:
        state['armed'] = True
        source.connection.call_later(settings['timeout'], source.connection.reset)
    return HOLD_EOF


def _failing(conn, settings):
    """The errors settings when `conn` is one of those transient fails, else None.

    Decided once per connection and epoch: the connections opened in the
    first `count` (or `period`) after the handler was set.  Connections opened
    before it was set pass.
    """
    state = conn.state(('transient', conn.epoch))
    if 'errors' not in state:
        epoch_index, epoch_time = conn.epoch
        if settings['period'] > 0:
            failing = 0 <= conn.opened - epoch_time < settings['period']
        else:
            failing = 0 <= conn.index - epoch_index < settings['count']
        state['errors'] = dict(conn.proxy.handlers['errors'].settings, **{
            key: settings[key] for key in ('protocol', 'status', 'message', 'code')}) \
            if failing else None
    return state['errors']


def _transient_connect(client, backend, name, settings, proxy):
    failing = _failing(client.connection, settings)
    if failing is not None:
        return _errors_greeting(client, backend, 'errors', failing, proxy)


@traits(on_connect=_transient_connect, check=_check_error_code,
        backend=lambda conn, settings: _failing(conn, settings) is None)
def transient(source, dest, to_backend, name, settings, proxy):
    """The first `count` connections get `errors`, later ones pass: a restart.

    Counting starts when the handler (or a behavior holding it) is set, or
    when the proxy starts; connections open before then pass.  The errors are
    those of the `errors` handler, with the settings below (the others of
    `errors`'s configured ones); failing connections never reach the backend.

    Settings:
      count (int >= 0, default 3): connections that fail.
      period (seconds >= 0, default 0): when above 0, the connections opened in the first `period` seconds fail instead.
      protocol (auto|http|redis|memcache|mysql|postgresql|smtp|raw, default auto): the protocol of the errors.
      status (int 100..599, default 503): HTTP status code of the errors.
      message (str, default ): error text; empty for the protocol's usual one.
      code (str, default ): MySQL error number, PostgreSQL SQLSTATE or SMTP reply code; empty for the default.
    """
    failing = _failing(source.connection, settings)
    if failing is not None:
        return errors(source, dest, to_backend, 'errors', failing, proxy)
    return normal(source, dest, to_backend, name, settings, proxy)


def _flap_connect(client, backend, name, settings, proxy):
    up, down = settings['up'], settings['down']
    phase = (time.monotonic() - client.connection.epoch[1]) % (up + down)
    if phase < up:
        return None
    if settings['mode'] == 'refuse':
        proxy.refuse_for(up + down - phase)
    client.abort()
    return False


@traits(on_connect=_flap_connect)
def flap(source, dest, to_backend, name, settings, proxy):
    """Alternates `up` seconds of service with `down` seconds of outage.

    The cycle starts when the handler is set (or the proxy starts).  In an
    outage, new connections are reset (blackout), or the listener closes until
    the outage ends so that connects are refused (refuse; the connection that
    found the outage is reset).  Connections opened while up keep working.

    Settings:
      up (seconds >= 0.001, default 5): seconds of service.
      down (seconds >= 0.001, default 5): seconds of outage.
      mode (refuse|blackout, default blackout): what new connections meet in an outage.
    """
    return normal(source, dest, to_backend, name, settings, proxy)


@directional
def corrupt(source, dest, to_backend, name, settings, proxy):
    """Flips one random bit in a `ratio` of the bytes relayed.

    Above 1/256, each chunk's share is a multiple of 1/256, rounded up or down
    at random: `ratio` on average.  Whole chunks are processed at once, a few
    milliseconds per MiB at any ratio.

    Settings:
      ratio (float 0..1, default 0.01): share of the bytes corrupted.
      direction (to_backend|to_client|both, default to_client): the traffic corrupted.
    """
    data = proxy.get_data(source)
    ratio = settings['ratio']
    if not data or not ratio:
        return dest.sendall(data)
    rng = source.connection.random
    flips = _flips_often(rng, len(data), ratio) if ratio >= 1 / 256 \
        else _flips_seldom(rng, len(data), ratio)
    dest.sendall((int.from_bytes(data, 'big') ^ flips).to_bytes(len(data), 'big'))


_BIT_OF_BYTE = bytes(1 << (value & 7) for value in range(256))
_BELOW = [bytes(0xFF if value < threshold else 0 for value in range(256))
          for threshold in range(257)]


def _flips_often(rng, size, ratio):
    """A mask of one random bit in a `ratio` of `size` bytes, with whole-buffer operations
    (a byte-by-byte loop would hold the pump for 0.3 s per MiB).

    A byte is picked when a random byte falls below ratio * 256, rounded up or
    down at random so that the share is `ratio` on average.
    """
    scaled = ratio * 256
    threshold = int(scaled) + (rng.random() < scaled - int(scaled))
    picked = rng.getrandbits(8 * size).to_bytes(size, 'big').translate(_BELOW[threshold])
    bits = rng.getrandbits(8 * size).to_bytes(size, 'big').translate(_BIT_OF_BYTE)
    return int.from_bytes(picked, 'big') & int.from_bytes(bits, 'big')


def _flips_seldom(rng, size, ratio):
    """The same mask, by geometric skips: each byte is hit with probability `ratio`."""
    flips, position = bytearray(size), -1
    while True:
        position += 1 + int(math.log(1.0 - rng.random()) / math.log1p(-ratio))
        if position >= size:
            return int.from_bytes(flips, 'big')
        flips[position] = 1 << rng.randrange(8)


BUILTIN_HANDLERS = (normal, delay, errors, hang, blackout, abort, bandwidth, slicer,
                    slow_close, timeout, limit_data, reset_peer, transient, flap, corrupt)
for _builtin in BUILTIN_HANDLERS:
    _builtin.blocking = False   # none of them waits: the pump calls them itself

#: The ids of what the pump calls of the built-in handlers, as handlers and as faults:
#: their calls are not timed for the slow-call warning (a fault spares each chunk two
#: clock reads).  Ids, for a handler need not be hashable.
_NEVER_SLOW = frozenset(id(function) for function in itertools.chain.from_iterable(
    (func, getattr(func, 'vaurien_undirected', (None, func))[1]) for func in BUILTIN_HANDLERS))


# ---------------------------------------------------------------------------
# Registry and behavior
# ---------------------------------------------------------------------------

class Handler:
    """A registered handler: its function, its schema and its configured settings."""

    def __init__(self, name, func, settings=None):
        if not callable(func):
            raise ConfigError('%r is not callable' % (func,))
        self.name, self.func = name, func
        wrapper, inner = getattr(func, 'vaurien_undirected', (None, None))
        self.undirected = inner if wrapper is func else func
        try:
            self.schema = parse_settings_doc(func.__doc__)
        except ValueError as exc:
            raise ConfigError('handler %s: %s' % (name, exc)) from None
        self.summary = summary_of(func)
        self.backend = getattr(func, 'backend', True)
        self.on_connect = getattr(func, 'on_connect', None)
        self.on_close = getattr(func, 'on_close', None)
        self.on_live = getattr(func, 'on_live', None)
        self.check = getattr(func, 'check', None)
        self.blocking = getattr(func, 'blocking', True)
        self.builtin = id(self.undirected) in _NEVER_SLOW   # its calls are not timed
        self.warned = False   # about a call that held the pump up
        self.origin = None    # where its settings were configured, for the log
        self.settings = {}
        self.settings = self.validate(settings or {})

    def needs_backend(self, connection, settings):
        """Whether a connection opening under this handler connects to the backend now."""
        if callable(self.backend):
            return self.backend(connection, settings)
        return self.backend

    def validate(self, values, warn=True, base=None):
        """Return the configured settings (or `base`) updated with `values`, typed and
        checked.

        Raises ConfigError naming the first setting that is unknown or wrong;
        with `warn`, logs a time of a minute or more given without a unit.
        """
        merged = dict(self.settings if base is None else base)
        if self.schema is None:  # an undocumented custom handler takes anything
            merged.update((key, parse_value(value) if isinstance(value, str) else value)
                          for key, value in values.items())
            return merged
        if not merged:
            merged = {key: setting.default for key, setting in self.schema.items()}
        for key, value in values.items():
            if key not in self.schema:
                raise ConfigError('unknown setting %r for handler %s (known: %s)' % (
                    key, self.name, ', '.join(sorted(self.schema)) or 'none'))
            try:
                merged[key] = self.schema[key].convert(value)
            except ValueError as exc:
                raise ConfigError('handler %s: setting %s = %r: %s' % (
                    self.name, key, value, exc)) from None
            if warn and self.schema[key].type == 'seconds' and merged[key] >= 60 and \
                    not (isinstance(value, str) and value.strip()[-1:].isalpha()):
                log.warning("handler %s: %s = %s is %s seconds; for milliseconds, write %sms "
                            "(in Python, the string '%sms')", self.name, key, value, value,
                            value, value)
        if self.check is not None:
            try:
                self.check(merged)
            except ValueError as exc:
                raise ConfigError('handler %s: %s' % (self.name, exc)) from None
        return merged

    def describe(self):
        """What --list-handlers and GET /handlers tell about this handler."""
        schema = self.schema or {}
        return {'summary': self.summary,
                'doc': inspect.cleandoc(self.func.__doc__ or ''),
                'settings': {key: {'type': s.kind, 'default': s.default, 'help': s.help,
                                   'value': self.settings.get(key)}
                             for key, s in schema.items()}}


def load_callable(dotted):
    """Import ``package.module.function`` or ``package.module:function``."""
    module_name, sep, attr = dotted.partition(':')
    if not sep:
        module_name, _, attr = dotted.rpartition('.')
    if not module_name or not attr:
        raise ConfigError('%r is not a dotted name (package.module.function)' % dotted)
    if module_name.split('.')[0] == BUNDLED:
        _find_bundled_handlers()
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:
        hint = ' (it is the handlers/ folder of Vaurien: copy it beside vaurien.py)' \
            if module_name.split('.')[0] == BUNDLED and BUNDLED not in sys.modules else ''
        raise ConfigError('cannot import %s: %s%s' % (shown(module_name), shown(str(exc)),
                                                       hint)) from None
    for part in attr.split('.'):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError('%s has no attribute %r' % (module_name, attr)) from None
    if not callable(target):
        raise ConfigError('%s is not callable' % dotted)
    return target


BUNDLED = 'vaurien_handlers'   # the handlers/ folder's name once installed, or aliased


def _find_bundled_handlers():
    """Make ``vaurien_handlers`` importable from a checkout or a vendored copy, where
    it is the handlers/ folder beside this file (pip installs it under that name,
    so that it never takes a name as common as "handlers")."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'handlers')
    init = os.path.join(folder, '__init__.py')
    try:
        with open(init, encoding='utf-8') as source:
            ours = 'VAURIEN_HANDLERS = True' in source.read()   # not a user's own handlers/
    except (OSError, UnicodeDecodeError):
        ours = False
    if BUNDLED not in sys.modules and ours:   # beside this file: it goes with this file
        spec = importlib.util.spec_from_file_location(BUNDLED, init,
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[BUNDLED] = module
        spec.loader.exec_module(module)


def default_handlers():
    """A fresh registry of the built-in handlers: {name: Handler}."""
    return {func.__name__: Handler(func.__name__, func) for func in BUILTIN_HANDLERS}


def unknown_handler(name, known):
    """'unknown handler 'error' (did you mean errors? known: ...)': the message, one line,
    with a hint for a Toxiproxy toxic's name, or for settings written into the name."""
    text = str(name)
    close = difflib.get_close_matches(text, list(known), n=1)
    if TOXICS.get(text, ('',))[0] in known:
        hint = "Toxiproxy's %s is %s here; " % (text, TOXICS[text][0])
    elif close:
        hint = 'did you mean %s? ' % close[0]
    elif any(sign in text for sign in '(:= '):
        hint = ("a handler's settings go apart: --set NAME.SETTING=VALUE, its "
                '[handler:NAME] section of the config file, or the API; ')
    else:
        hint = ''
    return 'unknown handler %r (%sknown: %s)' % (name, hint, ', '.join(sorted(known)))


class Behavior:
    """A mix like ``20:delay,10:errors``: the rest of 100 goes to `normal`."""

    def __init__(self, spec, handlers):
        self.entries = []  # (percent, name)
        entries = [part.strip() for part in str(spec).split(',')]
        if not any(entries):
            raise ConfigError('behavior %r is empty: expected PERCENT:HANDLER[,...]' % spec)
        for entry in entries:
            percent, sep, name = entry.partition(':')
            try:
                percent = float(percent) if percent.isascii() and '_' not in percent \
                    else None
            except ValueError:
                percent = None
            if not sep or percent is None or not name.strip():
                raise ConfigError('behavior entry %r is malformed: expected PERCENT:HANDLER, '
                                  'like 20:delay' % entry)
            name = name.strip()
            if not 0 < percent <= 100 or not math.isfinite(percent):
                raise ConfigError('behavior entry %r: the percentage must be above 0 and at '
                                  'most 100' % entry)
            if name not in handlers:
                raise ConfigError('behavior entry %r: %s' % (entry, unknown_handler(name,
                                                                                    handlers)))
            self.entries.append((percent, name))
        total = sum(percent for percent, _ in self.entries)
        if total > 100 + 1e-9:
            raise ConfigError('behavior %r adds up to %g%%, over 100' % (spec, total))
        if total < 100 - 1e-9:
            self.entries.append((round(100 - total, 9), 'normal'))

    def draw(self, rng):
        """The name of the handler for one new connection."""
        if len(self.entries) == 1:
            return self.entries[0][1]
        point = rng.random() * 100
        for percent, name in self.entries:
            point -= percent
            if point < 0:
                return name
        return self.entries[-1][1]

    @property
    def single(self):
        """The handler's name when the mix is one handler at 100%, else None."""
        return self.entries[0][1] if len(self.entries) == 1 else None

    def __str__(self):
        return ','.join('%s:%s' % (_number(percent), name) for percent, name in self.entries)


#: A fault's direction: the traffic it acts on (True: to the backend, False: to the
#: client), as Vaurien names it, or Toxiproxy (STREAMS).
DIRECTIONS = {'to_backend': (True,), 'upstream': (True,), 'to_client': (False,),
              'downstream': (False,), 'both': (True, False)}
STREAMS = {'upstream': 'to_backend', 'downstream': 'to_client'}


class Fault:
    """A fault stacked on a proxy's handler or mix: `handler` with its `settings`, on
    the traffic of `direction`, for a `toxicity` share of the connections.

    The fault's handler is called for the chunks of its direction only (a
    ``direction`` setting, as delay's, is the fault's); by default, the
    direction of the handler's setting, or both.  Whether a fault applies to
    a connection is drawn when the connection opens (and again when the
    toxicity changes), from the proxy's seed, the connection's index and the
    fault's name, so that the handlers' own draws are not disturbed.
    """

    def __init__(self, name, handler, settings=None, direction=None, toxicity=1.0):
        if not _good_name(name):
            raise ConfigError('a fault name is %s, not %s' % (_GOOD_NAME, shown(name)))
        self.name, self.handler = name, handler
        self.directional = handler.schema is not None and 'direction' in handler.schema
        self.settings = dict(handler.settings)
        self.direction = 'both'
        self.toxicity = 1.0
        self.draws = 0          # its toxicity was set this many times: each is drawn anew
        self.active = True      # False once removed: its timers do nothing
        self.touched = 0        # connections it applied to
        self.endings = {}       # how those connections ended
        self.toxic = None       # made through Toxiproxy's API: its type, stream, attributes
        self.closes_when_removed = False   # its connections, as Toxiproxy's timeout
        self.epoch = (0, time.monotonic())  # (accepted, time) when it was set, as Proxy's
        self.configure(settings or {}, direction, toxicity)

    def configure(self, settings, direction=None, toxicity=None):
        """Change settings (merged), direction and toxicity; checked before any changes."""
        settings = dict(settings)
        if direction is None and self.directional:
            direction = settings.pop('direction', None)
        if isinstance(direction, str):    # in any case, as a handler's choices
            direction = direction.strip().lower()
        if direction is not None and (not isinstance(direction, str) or
                                      direction not in DIRECTIONS):
            raise ConfigError('fault %s: direction %s is none of %s' % (
                self.name, shown(direction), ', '.join(DIRECTIONS)))
        if toxicity is not None and (isinstance(toxicity, bool) or not isinstance(
                toxicity, (int, float)) or not 0 <= toxicity <= 1):
            raise ConfigError('fault %s: toxicity %s is no number from 0 to 1' % (
                self.name, shown(toxicity)))
        direction = STREAMS.get(direction, direction) or (
            self.settings['direction'] if self.directional else self.direction)
        if self.directional:
            settings['direction'] = direction
        try:
            merged = self.handler.validate(settings, base=self.settings)
        except ConfigError as exc:
            raise ConfigError('fault %s: %s' % (self.name, exc)) from None
        self.settings, self.direction = merged, direction
        if toxicity is not None and toxicity != self.toxicity:
            self.toxicity, self.draws = float(toxicity), self.draws + 1

    @property
    def streams(self):
        """The directions it has a layer in: (True,), (False,) or (True, False)."""
        return DIRECTIONS[self.direction]

    def applies(self, connection):
        """Whether it applies to `connection`: drawn, reproducibly with a seed."""
        if self.toxicity >= 1 or self.toxicity <= 0:
            return self.toxicity >= 1
        seed = connection.proxy.seed
        rng = random.Random(None if seed is None else '%s:%d:%s:%d' % (
            seed, connection.index, self.name, self.draws))
        return rng.random() < self.toxicity

    def describe(self):
        """What the API and get_faults() tell of it."""
        return {'name': self.name, 'handler': self.handler.name,
                'settings': dict(self.settings), 'direction': self.direction,
                'toxicity': self.toxicity, 'connections': self.touched,
                'ended': dict(self.endings)}


# ---------------------------------------------------------------------------
# The pump: one selector loop for every connection of every Proxy
# ---------------------------------------------------------------------------

_EOF = object()  # queued on a Side: shut its socket's write half down here
_RST = object()  # queued on a Side: reset its connection (SO_LINGER 0) here
_NO_QUEUE = ()   # a Side's queue until it needs one: most sides never queue
_sequence = itertools.count()   # orders timers due at the same moment
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Pump:
    """One selector loop, in a thread of its own, serving every Proxy of the process.

    It accepts, connects to backends without blocking, reads, calls the
    handlers, flushes the queued writes and runs the timers.  Whatever touches
    a connection or a listener happens in this thread.  Other threads hand
    work over with `call_soon` (a byte on a socketpair wakes the loop up) or
    `call` (which waits for the result).  Registered with the selector is a
    callable per socket, ``on_event(mask)``; connections touched in a round
    are `settle`d at its end: their interest updated, or their end noticed.
    """

    ACCEPT_BATCH = 64    # connections accepted per readiness of a listener
    forked = False       # True in a forked child, where no thread runs it

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []                  # heap of [due, sequence, function, args]
        self.cancelled = 0                # timers cancelled since the heap was compacted
        self.ready = collections.deque()  # (function, args) handed over by any thread
        self.dirty = set()                # connections to settle at the end of the round
        self.probed = set()               # connections with a socket whose EOF was read
        self.probe_timer = None
        self.starving = False             # out of descriptors: logged once per episode
        self.starved_at = 0.0
        self._waker, self._wakeup = socket.socketpair()
        self._waker.setblocking(False)
        self._wakeup.setblocking(False)
        self._woken = False
        self.selector.register(self._wakeup, selectors.EVENT_READ, self._drain_wakeup)
        self._spare = self._open_spare()
        self.pid = os.getpid()
        thread = threading.Thread(target=self._run, name='vaurien-pump', daemon=True)
        thread.start()
        self.ident = thread.ident     # the same as the loop sets first, before any event

    # -- what other threads and the loop use --------------------------------------------

    def in_loop(self):
        return _thread.get_ident() == self.ident

    def call_soon(self, function, *args):
        """Run ``function(*args)`` in the loop, after what was handed over before."""
        if self.forked:
            self.refuse_forked()
        self.ready.append((function, args))
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):
                self._waker.send(b'\0')

    def call(self, function, *args):
        """Run ``function(*args)`` in the loop; return its result or raise its exception."""
        if self.forked:     # forked by a handler, say: this thread is no loop's here
            self.refuse_forked()
        if self.in_loop():
            return function(*args)
        done, outcome = threading.Event(), []

        def job():
            try:
                outcome.append((True, function(*args)))
            except Exception as exc:
                outcome.append((False, exc))
            finally:
                done.set()
        self.call_soon(job)
        done.wait()
        succeeded, value = outcome[0]
        if succeeded:
            return value
        raise value

    def call_at(self, due, function, *args):
        """Run ``function(*args)`` in the loop at `due` (monotonic); from the loop only.

        Returns the timer, which `cancel` takes.
        """
        timer = [due, next(_sequence), function, args]
        heapq.heappush(self.timers, timer)
        if self.cancelled > 512 and 2 * self.cancelled > len(self.timers):
            self._compact()
        return timer

    def call_later(self, seconds, function, *args):
        return self.call_at(time.monotonic() + seconds, function, *args)

    def probe_later(self, conn):
        """Have `conn` look, within PROBE_EVERY, for a reset on its sockets whose EOF
        was read: watched for nothing (readable for good, they would spin the loop),
        they show a reset only when asked.  One timer serves every connection."""
        self.probed.add(conn)
        if self.probe_timer is None:
            self.probe_timer = self.call_later(PROBE_EVERY, self._probe)

    def _probe(self):
        self.probe_timer = None
        probed, self.probed = self.probed, set()
        for conn in probed:
            self.guarded(conn.probe, ())

    def cancel(self, timer):
        """Make `timer` do nothing (and hold nothing) when it falls due."""
        timer[2], timer[3] = _ignore, ()
        self.cancelled += 1

    def _compact(self):
        """Drop the cancelled timers from the heap (in place: `_run_timers` may be
        popping from it), so that long timers of ended connections do not pile up."""
        self.timers[:] = [timer for timer in self.timers if timer[2] is not _ignore]
        heapq.heapify(self.timers)
        self.cancelled = 0

    def starved(self, exc, what):
        """Out of descriptors: one error line for each episode (it ends after a second
        without a shortage, with a line that says so)."""
        self.starved_at = time.monotonic()
        if not self.starving:
            self.starving = True
            log.error('out of file descriptors (%s): %s until some close; raise the limit '
                      '(ulimit -n)', exc.strerror or exc, what)
            self.call_later(1.0, self._check_fed)

    def _check_fed(self):
        if time.monotonic() - self.starved_at < 1.0:
            self.call_at(self.starved_at + 1.0, self._check_fed)
        else:
            self.starving = False
            log.warning('file descriptors available again: no shortage for a second')

    def shed(self, listener):
        """Accept one connection with the spare descriptor, and reset it at once.

        False when there is no spare (it could not be opened again yet) or
        nothing to accept.
        """
        self.restock()
        if self._spare < 0:
            return False
        os.close(self._spare)
        try:
            sock, _ = listener.accept()
        except OSError:
            sock = None
        else:
            _reset(sock)
        self._spare = self._open_spare()
        return sock is not None

    def refuse_forked(self):
        """Raise: in a forked child, no thread runs this pump."""
        raise VaurienError('this proxy runs in process %d, which forked this one: drive it '
                           'from there, or through its control API (Client)' % self.pid)

    def restock(self):
        """Open the spare descriptor again if shedding used it up (call when some closed)."""
        if self._spare < 0:
            self._spare = self._open_spare()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self):
        self.ident = _thread.get_ident()
        while True:
            try:
                self._round()
            except Exception:   # a bug of ours: logged, and the loop goes on
                log.exception('the pump failed; it goes on')

    def _round(self):
        for key, mask in self.selector.select(self._timeout()):
            key.data(mask)
        if self.timers:
            self._run_timers()
        if self.ready:
            self._run_ready()
        dirty = self.dirty
        while dirty:
            conn = dirty.pop()
            try:
                conn.settle()
            except Exception:   # a bug of ours: that connection ends, the others go on
                log.exception('connection #%d failed', conn.index)
                self.guarded(conn.kill, ())

    def _timeout(self):
        if self.ready:
            return 0
        if self.timers:   # at most an hour: poll() takes no more than 24 days
            return min(3600.0, max(0.0, self.timers[0][0] - time.monotonic()))
        return None

    def _run_timers(self):
        now, timers = time.monotonic(), self.timers
        while timers and timers[0][0] <= now:
            _, _, function, args = heapq.heappop(timers)
            self.guarded(function, args)

    def _run_ready(self):
        for _ in range(len(self.ready)):
            function, args = self.ready.popleft()
            self.guarded(function, args)

    @staticmethod
    def guarded(function, args):
        try:
            function(*args)
        except Exception:
            log.exception('the pump failed running %r; it goes on', function)

    def _drain_wakeup(self, mask):
        with contextlib.suppress(OSError):
            self._wakeup.recv(4096)
        self._woken = False

    @staticmethod
    def _open_spare():
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return -1


def _ignore(*args):
    """What a cancelled timer runs."""


_pump = None
_pump_lock = threading.Lock()
_SERVERS = weakref.WeakSet()    # the Proxy, ControlServer and ToxiproxyServer objects made


def shared_pump():
    """The process's Pump, started on first use (and again in a forked child)."""
    global _pump
    with _pump_lock:
        if _pump is None or _pump.pid != os.getpid():
            _pump = Pump()
        return _pump


def _after_fork_in_child():
    """A forked child runs none of its parent's threads.  Its copies of the parent's
    listening and relayed sockets are closed: while it held them, the parent's closes
    sent nothing (a disabled proxy still took connections, a reset was no reset, a
    port stayed taken).  The parent's proxies refuse to be driven from the child."""
    global _pump_lock
    _pump_lock = threading.Lock()    # other threads may have held these at the fork
    EVENTS.lock = threading.Lock()
    if _pump is not None:
        _pump.forked = True
    for server in list(_SERVERS):
        server.socket.close()
        if isinstance(server, ToxiproxyServer):
            server.serving = False    # no thread serves it here: stop() waits for none
        for conn in list(getattr(server, '_connections', ())):
            for side in conn.sides:
                if side.sock is not None:
                    side.sock.close()


if hasattr(os, 'register_at_fork'):    # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Worker:
    """A thread that runs one connection's blocking handler calls, one at a time, in order.

    It starts with the first job and ends after IDLE seconds without one.
    """

    IDLE = 1.0

    def __init__(self):
        self.jobs = collections.deque()
        self.condition = threading.Condition()
        self.running = False
        self.ident = None       # its thread's, while it runs
        self.calling = None     # the Fault whose hook or handler it is calling

    def submit(self, function, *args):
        with self.condition:
            self.jobs.append((function, args))
            if self.running:
                return self.condition.notify()
            # threading's: a bare _thread stays in threading.enumerate() for good, as a
            # dummy, once its handler logs or calls current_thread()
            try:
                threading.Thread(target=self._run, name='vaurien-worker', daemon=True).start()
            except RuntimeError:     # no thread to be had: the job is not taken
                self.jobs.pop()
                raise
            self.running = True

    def _run(self):
        self.ident = _thread.get_ident()
        while True:
            with self.condition:
                if not self.jobs:
                    self.condition.wait(self.IDLE)
                if not self.jobs:
                    self.running = False
                    self.ident = None
                    return
                function, args = self.jobs.popleft()
            function(*args)


def _frozen(data):
    """`data` as the handler can no longer change it: a buffer (a bytearray, an array, a
    view of one) is copied, for the handler may reuse it at once; bytes, and views of
    bytes, are not.  What is no buffer (a str) raises TypeError, in the handler's call."""
    if type(data) is bytes or isinstance(data, memoryview) and data.readonly:
        return data
    return bytes(memoryview(data))


def _in_pump(method):
    """Make a method of a Connection or Side run in the pump: called from another
    thread (a blocking handler's worker), it is handed over there, in order."""
    @functools.wraps(method)
    def handed_over(self, *args):
        pump = self.pump
        if _thread.get_ident() != pump.ident:
            return pump.call_soon(method, self, *args)
        return method(self, *args)
    return handed_over


class _Dest:
    """What a handler's `dest` (a Side, or a fault's Layer) does beyond sendall()."""

    __slots__ = ()

    def shutdown(self, how=socket.SHUT_WR, delay=0.0):
        """Send EOF (half-close) after what is queued; SHUT_RDWR closes the connection."""
        if how != socket.SHUT_WR:
            return self.close()
        self._end(_EOF, delay)

    def close(self):
        """End the whole connection: flush what is queued, send EOF, then close."""
        if self.connection is not None:   # else a Side kept beyond its connection's end
            self.connection.close()


class Side(_Dest):
    """One end of a relayed connection, as handlers see it (`source`, `dest`).

    Writes never block: `sendall` sends what the socket takes now and queues
    the rest, or all of it when a `delay` is given, keeping order; the pump
    flushes the queue when the socket is writable.  Writes to a backend that
    is still connecting wait in its queue.  Once the connection is closing,
    writes are dropped.  Called from a blocking handler's thread, the calls
    are handed to the pump, in order.
    """

    __slots__ = ('connection', 'name', 'sock', 'peer', 'queue', 'queued', 'last_due', 'data',
                 'eof_read', 'eof_queued', 'eof_sent', 'broken', 'connecting', 'chunk',
                 'events', 'callback', 'delivered', 'staged', 'held', 'inlet',
                 'pump', 'direct', 'pending')

    def __init__(self, connection, name, sock=None):
        self.connection = connection
        self.pump = connection.pump
        self.name = name          # 'client' or 'backend'
        self.sock = sock          # None until the backend is connecting
        self.peer = None
        self.queue = _NO_QUEUE    # then a deque of [due, bytes, _EOF or _RST], due in order
        self.queued = 0           # bytes in the queue
        self.last_due = 0.0       # what is sent next waits for it: the due time of the last
                                  # entry queued, or the end of a pace's pause (0: none)
        self.data = None          # the chunk the handler is being called for
        self.eof_read = False     # this socket sent us its EOF
        self.eof_queued = False   # its write half is (to be) shut down, or reset
        self.eof_sent = False
        self.broken = False       # reset, or failed: no more reads or writes
        self.connecting = False   # a backend being resolved or connected
        self.chunk = CHUNK        # bytes to read at once: grows on bulk transfers
        self.events = 0           # what the selector watches this socket for
        self.callback = None      # what the selector calls: on_event, or _read_quickly
        self.delivered = 0        # bytes sent to this socket
        self.staged = 0           # bytes (and entries) on their way here, in fault layers
        self.held = 0             # ... and in calls handed to the worker
        self.pending = 0          # ... of which calls handed over to send here
        self.inlet = self         # where what is sent here enters: the first Layer, if any
        self.direct = False       # read the quick way, its chunks go to its peer's socket

    @property
    def side(self):
        """The Side a dest's chain ends at (a Layer's `side`): itself."""
        return self

    def takes_directly(self):
        """Whether a chunk for this side may go straight to its socket: no fault layer,
        nothing queued or pausing, connected and open (`sendall`'s quick way)."""
        return (self.inlet is self and self.sock is not None and not self.connecting
                and not self.eof_queued and not self.queue and not self.last_due)

    def waiting(self):
        """Bytes (and entries) on their way to this side: queued, in fault layers, and
        in the worker.  Over HIGH_WATER, its peer is not read."""
        return self.queued + self.staged + self.held

    def __repr__(self):
        return '<Side %s of connection #%s>' % (
            self.name, '?' if self.connection is None else self.connection.index)

    def sendall(self, data, delay=0.0, pace=None):
        """Send `data` to this side, `delay` seconds from now, after what is queued.

        A backend not yet connected is connected first; the data waits meanwhile.
        With `pace`, the data goes out in pieces: ``pace(available)`` gives the
        size of the next piece (at most `available` bytes are left) and the
        seconds before the piece after it.  Pieces are cut as they go, so
        pacing costs no memory per piece.
        """
        if _thread.get_ident() != self.pump.ident:
            return self.pump.call_soon(
                self._send_at, _frozen(data), time.monotonic() + delay if delay > 0 else 0.0,
                pace)
        if not data or self.eof_queued or self.broken:
            return
        if delay <= 0 and pace is None and not self.queue and not self.last_due \
                and not self.connecting and self.sock is not None:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return self.connection.lost(self)
            self.delivered += sent
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._send_at(data, time.monotonic() + delay if delay > 0 else 0.0, pace)

    def answer_and_close(self, data):
        """Send `data` and close, the data and the EOF in one segment where TCP_CORK
        exists (Linux): a pooled client that reads the answer sees the EOF with it,
        and never sends its next request on a connection that is ending."""
        self._answer_and_close(_frozen(data))   # from a worker: handed over as it is now

    @_in_pump
    def _answer_and_close(self, data):
        if self.connection is None:    # kept beyond the connection's end
            return
        corked = self.sock is not None and not self.broken and _CORK
        if corked:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)   # the FIN uncorks
        self.sendall(data)
        self.connection.close()
        if corked and not self.eof_sent:     # the EOF waits (faults, a slow reader):
            with contextlib.suppress(OSError):   # the answer goes now, not in 200 ms
                self.sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)

    def abort(self):
        """Reset this side now (RST, through SO_LINGER 0) and end the connection."""
        if self.connection is not None:
            self.connection.abort(self)

    def on_event(self, mask):
        """The selector's call for a side read or written the general way (a method, not
        a partial of `Connection.on_event`: Python calls it without a C frame)."""
        conn = self.connection
        if conn is not None:     # else ended earlier in this round
            conn.on_event(self, mask)

    def _read_quickly(self, mask):
        """The selector's call for a side read the quick way (see
        `Connection._reads_quickly`): what `Connection._read` and `_dispatch` do
        with a chunk of a steady connection under `normal`, in the fewest steps.
        When the pump settled it, it saw whether its peer `takes_directly`: then
        the chunk goes straight to the peer's socket (whatever would change that,
        a queue filling or a fault laid, touches the connection), else to the
        peer's inlet.  An end, a full chunk, a handler set since the connection was
        settled, or anything touching it in this round (a fault closing it, say),
        take the general way, `Connection.on_event`."""
        conn = self.connection
        if conn is None:       # ended earlier in this round
            return
        if conn.settled is not conn.proxy.handling or conn in self.pump.dirty:
            self.pump.dirty.add(conn)     # settled anew at the end of the round
            return conn.on_event(self, mask)
        try:
            data = self.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            conn.lost(self)
            return self.pump.dirty.add(conn)
        if not data or len(data) == CHUNK:
            return conn.on_event(self, mask, data)
        peer = self.peer
        try:
            if conn.first is None:
                conn.saw_first(self, data)
            if not self.direct:
                return peer.inlet.sendall(data)
            try:    # sendall's quick way, inlined: the relay's busiest lines
                sent = peer.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                conn.lost(peer)
                return self.pump.dirty.add(conn)
            peer.delivered += sent
            if sent < len(data):      # the rest waits in the peer's queue: settled anew
                peer._send_at(memoryview(data)[sent:], 0.0)
        except Exception:
            conn.failed_in_pump()

    def take(self, item):
        """What the last fault layer passes on: bytes, or the end (_EOF or _RST)."""
        if item is _EOF or item is _RST:
            return self._end(item)
        self.sendall(item)

    def _send_at(self, data, due, pace=None):
        if not data or self.eof_queued or self.broken:
            return
        if self.sock is None and not self.connecting:
            self.connection.connect_backend()
        data = _frozen(data)    # the handler may change it while it waits
        self._push(due, data, pace)
        self.queued += len(data) + ENTRY_COST
        if pace is not None and len(self.queue) == 1 and self.queue[0][0] <= time.monotonic() \
                and not self.connecting:   # its first piece goes now, not a round later
            self.connection._flush(self)

    def _end_in_pump(self, marker, delay=0.0):
        """Queue the end of this side's stream: _EOF (a FIN) or _RST, once (in the pump;
        `_end` is the same from any thread)."""
        if self.eof_queued:
            if marker is _RST:
                self._reset_instead()
            return
        self.eof_queued = True
        if (self.sock is None and not self.connecting) or self.broken:
            self.eof_sent = True
        elif marker is _RST and delay <= 0 and not self.queue and not self.connecting:
            self.connection._drop(self, reset=True)    # no byte before it: no pause holds it
        elif marker is _EOF and delay <= 0 and not self.queue and not self.last_due \
                and not self.connecting:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:   # the peer is gone: its reset is read next
                pass
            self.eof_sent = True
            self.pump.dirty.add(self.connection)   # its peer is no longer read `direct`
        else:
            self._push(time.monotonic() + delay if delay > 0 else 0.0, marker)

    _end = _in_pump(_end_in_pump)

    def _reset_instead(self):
        """A reset after the EOF was queued or sent: it replaces the EOF still queued,
        after the bytes before it, or resets now (no pause or delay holds a reset that
        has no byte before it; a stream already ended: its peer may still be writing)."""
        queue = self.queue
        if queue and queue[-1][1] is _EOF:
            if len(queue) > 1 or self.connecting:
                queue[-1][1] = _RST
            else:
                self.connection._drop(self, reset=True)
        elif self.eof_sent and not self.broken:
            self.connection._drop(self, reset=True)

    def _push(self, due, data, pace=None):
        """Queue `data` (or a marker) due at `due`, after what is queued.

        An entry is [due, data], or [due, data, pace, bytes left of the
        piece going out, seconds after it] when paced.
        """
        due = max(due, self.last_due)
        self.last_due = due
        if self.queue is _NO_QUEUE:
            self.queue = collections.deque()
        self.queue.append([due, data] if pace is None else [due, data, pace, 0, 0.0])
        self.pump.dirty.add(self.connection)


def _size(item):
    """The bytes of a queued item (0 for _EOF and _RST)."""
    return len(item) if isinstance(item, (bytes, memoryview)) else 0


def _held_size(item):
    """What a chunk handed to the worker counts against HIGH_WATER: its bytes and an
    entry's cost; an end (b'', _EOF or _RST) nothing, for it holds no byte to lose."""
    size = _size(item)
    return size + ENTRY_COST if size else 0


class Layer(_Dest):
    """One direction of a connection, past one layer of its fault stack.

    A connection with faults has, each way, a chain of layers between the
    handler in force and the socket.  The first layer is the handler's
    `dest` (it has no fault); each other one holds a fault, and is the `dest`
    of that fault's handler.  What a handler sends through its layer (with
    ``sendall(delay=, pace=)``, ``shutdown``) waits there for its due time, in
    order, then goes on to the next layer's fault handler (as its chunk, or
    its EOF) or, past the last, to the socket's `Side`.  So a delay in one
    layer delays what later layers see, as in Toxiproxy's toxic chain.  A
    handler's `source` is the Side the data comes from: what it answers there
    goes straight to that socket.

    A layer whose fault is removed passes what it holds on at once (and an
    EOF its handler held), and whatever reaches it later, without its
    handler: no byte is lost, repeated or reordered.  A closing connection's
    layers call no handler either: what they hold goes out in its time, and
    then the EOF; but the layers of the fault that closed it (limit_data,
    timeout) let no more data through, as Toxiproxy's chain ends there.
    """

    __slots__ = ('connection', 'pump', 'fault', 'to_backend', 'source', 'side', 'next',
                 'applied', 'removed', 'sealed', 'held_eof', 'queue', 'last_due',
                 'eof_queued', 'timer', 'pending')

    def __init__(self, connection, fault, to_backend, applied=True):
        self.connection = connection
        self.pump = connection.pump
        self.fault = fault          # None for the first layer: the handler's own
        self.to_backend = to_backend
        self.source = connection.client if to_backend else connection.backend
        self.side = self.source.peer   # the socket this chain ends at
        self.next = self.side
        self.applied = applied      # the fault's toxicity drawn for this connection
        self.removed = False
        self.sealed = False         # its fault closed the connection: nothing more passes
        self.held_eof = False       # its handler kept an EOF from going on (HOLD_EOF)
        self.queue = collections.deque()   # [due, bytes or _EOF or _RST, (pace, pause)]
        self.last_due = 0.0         # what is sent next waits for it, as a Side's
        self.eof_queued = False
        self.timer = None
        self.pending = 0            # bytes of calls in the worker that send through it

    def __repr__(self):
        return '<Layer %s to the %s of connection #%d>' % (
            self.fault.name if self.fault else 'handler', self.side.name,
            self.connection.index)

    @property
    def name(self):
        return self.side.name

    # -- what the handler before it uses, as its `dest` ---------------------------------

    def sendall(self, data, delay=0.0, pace=None):
        """Pass `data` on to the next layer, `delay` seconds from now, after what waits
        here; with `pace`, in pieces, as `Side.sendall` does."""
        due = time.monotonic() + delay if delay > 0 else 0.0
        if _thread.get_ident() != self.pump.ident:
            return self.pump.call_soon(self._send_at, _frozen(data), due, pace)
        if due or pace is not None or self.queue or self.last_due or self.eof_queued \
                or not data:
            return self._send_at(data, due, pace)
        self.next.take(data)     # the steady state, said quickly

    def abort(self):
        """Reset the socket this chain ends at, and end the connection."""
        self.side.abort()

    def _send_at(self, data, due, pace=None):
        if not data or self.eof_queued:
            return
        data = _frozen(data)    # the handler may change it while it waits
        if not self.queue:
            if self.removed:    # what its handler still sends goes at once
                return self.next.take(data)
            now = time.monotonic()
            if due <= now and self.last_due <= now:    # nothing to wait for: on now
                if pace is None:
                    self.last_due = 0.0     # sendall's quick way is open again
                    return self.next.take(data)
                data, rest, pause = self._cut(data, pace)    # a first piece, at least
                self.last_due = now + pause
                if rest:
                    self._push(self.last_due, rest, pace)
                return self.next.take(data)
        self._push(due, data, pace)

    def _end_in_pump(self, marker, delay=0.0):
        """As `Side._end_in_pump`: the end of what passes this layer."""
        if self.eof_queued:      # a reset after the EOF replaces it, or follows it
            if marker is _RST:
                if len(self.queue) > 1:     # after the data before the EOF
                    self.queue[-1][1] = _RST
                    return
                if self.queue:     # only the EOF: no pause or delay holds a reset
                    self.queue.clear()
                    self.side.staged -= ENTRY_COST
                    self._disarm()
                self.next.take(_RST)
            return
        self.eof_queued = True
        if not self.queue and (self.removed or delay <= 0 and (
                marker is _RST or self.last_due <= time.monotonic())):
            return self.next.take(marker)    # an EOF waits for a pause, a reset does not
        self._push(time.monotonic() + delay if delay > 0 else 0.0, marker)

    _end = _in_pump(_end_in_pump)

    def _push(self, due, item, pace=None):
        due = max(due, self.last_due)
        self.last_due = due
        self.queue.append([due, item] if pace is None else [due, item, pace, 0.0])
        side = self.side
        side.staged += _size(item) + ENTRY_COST
        if side.waiting() >= HIGH_WATER:   # the reading must stop: settle
            self.pump.dirty.add(self.connection)
        if len(self.queue) == 1:
            self._arm(due)

    @staticmethod
    def _cut(item, pace):
        """(the next piece of `item`, the rest or None, the pause after the piece), by
        ``pace(len(item))``: (size, pause)."""
        size, pause = pace(len(item))
        size = max(1, int(size))
        if size < len(item):
            return item[:size], item[size:], pause
        return item, None, pause

    def _arm(self, due):
        self._disarm()
        self.timer = self.pump.call_at(due, self._due)

    def _disarm(self):
        if self.timer is not None:
            self.pump.cancel(self.timer)
            self.timer = None

    def _due(self):
        """The timer's call: what falls due may end the connection (an EOF sent)."""
        self.timer = None
        self._flush()
        self.pump.dirty.add(self.connection)

    def _flush(self):
        """Pass on what is due, in order; wait for the rest."""
        queue, now = self.queue, time.monotonic()
        while queue and queue[0][0] <= now:
            entry = queue[0]
            item, whole = entry[1], True
            if len(entry) > 2:    # paced: a piece now, the rest after the pause
                item, rest, entry[3] = self._cut(item, entry[2])
                if rest:
                    entry[0], entry[1], whole = now + entry[3], rest, False
            if whole:
                queue.popleft()
                if len(entry) > 2:   # the pause after the last piece holds what follows
                    self.last_due = max(self.last_due, now + entry[3])
                    if queue:
                        queue[0][0] = max(queue[0][0], now + entry[3])
            self.side.staged -= _size(item) + (ENTRY_COST if whole else 0)
            self.next.take(item)
        if queue:
            self._arm(queue[0][0])

    # -- what the layer before it hands over -------------------------------------------

    def take(self, item):
        """`item` reached this layer: its fault's handler gets it (b'' for an EOF), or,
        the fault not applied, removed or the connection closing, it passes on."""
        conn = self.connection
        if not self.applied or self.removed or conn.closing_at is not None or item is _RST:
            if self.sealed and item is not _EOF and item is not _RST:
                return
            if conn.jobs:   # calls in the worker: this one follows them there, in order
                if item is not _EOF and item is not _RST:
                    item = _frozen(item)     # what sent it may change it meanwhile
                return conn._run_for(None, self._relay, (item,), self, _held_size(item))
            return self._relay(item)
        fault = self.fault
        handler = fault.handler
        if handler.builtin and conn.worker is None and item is not _EOF:
            if conn.released:    # a dest kept beyond its connection's end
                return
            # The steady state, said quickly: _handle's and _call_as's work for a chunk
            # and a built-in (untimed), without their two calls, a seventh of a fault's
            # cost per chunk.
            source = self.source
            saved, source.data = source.data, item
            calling, conn.calling = conn.calling, fault
            try:
                result = handler.undirected(source, self, self.to_backend, fault.name,
                                            fault.settings, conn.proxy)
            except Exception:
                result = conn.failed(fault)
            finally:
                conn.calling, source.data = calling, saved
            if result is False:
                conn.close(fault)
            return
        data = b'' if item is _EOF else item
        if handler.blocking or conn.jobs:
            data = _frozen(data)     # what sent it may change it meanwhile
            return conn._run_for(handler, self._handle, (data,), self, _held_size(data))
        self._handle(data)

    def _relay(self, item):
        if item is _EOF or item is _RST:
            return self._end(item)
        self.sendall(item)

    def _handle(self, data):
        conn, fault, source = self.connection, self.fault, self.source
        if conn.released:
            return
        saved, source.data = source.data, data
        try:
            result = conn._call_as(fault, fault.handler.undirected, source, self, self.to_backend,
                                   fault.name, fault.settings, conn.proxy)
        finally:
            source.data = saved
        if result is False:    # an EOF goes on, past the layers that have passed it
            conn.close(fault)
        if not data:
            if isinstance(result, str) and result == HOLD_EOF:
                conn._in_loop(self._hold_eof)
            else:
                self.shutdown()

    def _hold_eof(self):
        """In the pump (a worker's call may end after its fault was removed): keep the EOF,
        or pass it on if the layer passes everything on by now."""
        self.held_eof = True
        if self.removed or not self.applied or self.connection.closing_at is not None:
            self.release_eof()

    def release_eof(self):
        """Pass on the EOF its handler held, if it held one."""
        if self.held_eof:
            self.held_eof = False
            self._end(_EOF)

    def drop_data(self):
        """Drop the data it holds (a fault after it closed the connection); an EOF or a
        reset it holds stays."""
        kept = [entry for entry in self.queue if not _size(entry[1])]
        self.side.staged -= sum(_size(entry[1]) + ENTRY_COST for entry in self.queue
                                if _size(entry[1]))
        self.queue.clear()    # in place: this layer's _flush may be passing what it holds
        self.queue.extend(kept)
        self.last_due = kept[-1][0] if kept else 0.0
        self._disarm()
        if kept:
            self._arm(kept[0][0])

    def remove(self):
        """Its fault was removed: pass on at once, in order, what it holds, and the EOF
        its handler held."""
        self.removed = True
        self.let_go(ends=True)
        self.release_eof()

    def let_go(self, ends=False):
        """Pass on at once, in order, the data it holds; with `ends`, the EOF or reset
        queued after it too, else they keep their time (a slow_close's close)."""
        for entry in self.queue:
            if ends or _size(entry[1]):
                entry[:] = [0.0, entry[1]]     # unpaced too
        self.last_due = self.queue[-1][0] if self.queue else 0.0
        self._disarm()
        if self.queue:
            self._flush()

    def stop(self):
        """The connection ended: drop what it holds."""
        self._disarm()
        self.queue.clear()


class Connection:
    """Relays one client connection to the backend, through the handler in force.

    Everything here runs in the pump's thread, but for the calls of a blocking
    handler, which run in the connection's `_Worker` and hand their effects
    back to the pump in order (see `_dispatch`).
    """

    __slots__ = ('proxy', 'pump', 'address', 'index', 'drawn', 'opened', 'client', 'backend',
                 'sides', 'handler_name', '_random', 'states', 'closers', 'closing_at',
                 'drain_until', 'released', 'wake_timer', 'targets', 'worker', 'jobs',
                 'first', 'connect_timer', 'ending', 'chains', 'calling', 'applied_faults',
                 'timers', 'call_time', 'settled')

    def __init__(self, proxy, sock, address, index, drawn):
        self.proxy = proxy
        self.pump = proxy.pump
        self.address = address
        self.index = index        # accept order, from 0
        self.drawn = drawn        # the handler's name drawn from the behavior
        self.opened = time.monotonic()
        self.client = Side(self, 'client', sock)
        self.backend = Side(self, 'backend')
        self.client.peer, self.backend.peer = self.backend, self.client
        self.sides = (self.client, self.backend)
        self.handler_name = drawn
        self._random = None
        self.states = None
        self.closers = None       # {(handler, name): fault} called here, with an on_close
        self.closing_at = None    # deadline once the connection is closing
        self.drain_until = None   # the latest it may be pushed to by a peer still talking
        self.released = False
        self.wake_timer = None    # the pump's timer to look at this connection again
        self.targets = None       # backend addresses still to try
        self.connect_timer = None
        self.worker = None        # the _Worker of blocking handlers, once needed
        self.jobs = 0             # calls handed to the worker whose effects are not all in
        self.first = None         # (from the client?, first bytes): what protocol it speaks
        self.ending = None        # (kind, text): how it ended, the first cause seen
        self.chains = None        # with faults: its Layers each way, (to_client, to_backend)
        self.calling = None       # the Fault whose hook or handler the pump is calling
        self.applied_faults = ()  # the faults that applied to it
        self.timers = None        # {key: timer} of call_later, cancelled at its end
        self.call_time = 0.0      # seconds the pump spent in its handlers' calls
        self.settled = None       # the proxy's `handling` when it was last settled

    # -- what handlers use ------------------------------------------------------

    @property
    def random(self):
        """This connection's random.Random, seeded from --seed and its index."""
        if self._random is None:   # made on first use: a Random is costly to make
            seed = self.proxy.seed
            self._random = random.Random(None if seed is None else '%s:%d' % (seed, self.index))
        return self._random

    @property
    def epoch(self):
        """(connections accepted, time) when the handler or fault being called was set:
        what transient and flap count from."""
        fault = self.caller()
        return self.proxy.epoch if fault is None else fault.epoch

    def caller(self):
        """The Fault whose hook or handler this thread is calling (None: the handler's):
        the pump and the connection's worker each have theirs; another thread (a
        user's timer, say) calls none."""
        if self.pump.in_loop():
            return self.calling
        worker = self.worker
        if worker is not None and worker.ident == _thread.get_ident():
            return worker.calling
        return None

    def state(self, key):
        """A dict a handler keeps for this connection under `key`."""
        if self.states is None:
            self.states = {}
        return self.states.setdefault(key, {})

    def call_later(self, seconds, function):
        """Call `function()` after `seconds`, unless by then the connection is closing
        or the handler in force is no longer the one that armed it.

        It runs where the caller runs: in the pump, or in the worker of a
        blocking handler.
        """
        due, blocking = time.monotonic() + seconds, not self.pump.in_loop()
        armed = self.caller() or self.current()[0]
        self._in_loop(self._arm, due, function, blocking, armed)

    def _arm(self, due, function, blocking, armed):
        """A timer of call_later, kept to be cancelled with the connection."""
        if self.released:
            return
        if self.timers is None:
            self.timers = {}
        key = next(_sequence)
        self.timers[key] = self.pump.call_at(due, self._timer, key, function, blocking, armed)

    def close(self, fault=None):
        """Flush what is queued, send EOF both ways, drain, then close.

        What was queued is sent first, however slowly the peer reads; then
        the connection ends when both sides sent their EOF, or LINGER seconds
        later.  Killed with bytes still queued, a side is reset, so that a
        truncation is never mistaken for a whole answer.  Closed by a fault
        (`fault`, or the one being called), what has not passed it yet is
        dropped.
        """
        fault = fault or self.caller()
        if not self.pump.in_loop():
            return self.pump.call_soon(self._close, fault)
        self._close(fault)

    def _close(self, fault):
        if self.released:    # a late call (a name resolved after the end, say)
            return
        if self.closing_at is None:
            self._seal(fault)
            self.ending = self.ending or ('closed', 'closed by the handler')
            now = time.monotonic()
            self.closing_at = max(self.client.last_due, self.backend.last_due, now, *(
                layer.last_due for chain in self.chains or () for layer in chain)) + LINGER
            self.drain_until = now + MAX_DRAIN
            for side in self.sides:
                side.inlet.shutdown()   # after what the fault layers hold
            for layer in self._layers_of(None, every=True):
                layer.release_eof()     # an EOF a fault held goes on too
        self.pump.dirty.add(self)

    def _seal(self, fault):
        """`fault` closes the connection: its layers let no more data through, and the
        layers before them drop the data they hold (it would be dropped there, later)."""
        for chain in self.chains or ():
            for index, layer in enumerate(chain):
                if fault is not None and layer.fault is fault:
                    layer.sealed = True
                    for before in chain[:index]:
                        before.drop_data()

    @_in_pump
    def abort(self, side):
        """Reset `side` now and close the other one."""
        self.ending = self.ending or ('reset', 'reset by the handler (%s)' % side.name)
        self._drop(side, reset=True)
        self.close()

    @_in_pump
    def reset(self):
        """Reset both sides now (an RST each way): what either still holds is lost."""
        self.ending = self.ending or ('reset', 'reset by the handler (both sides)')
        for side in self.sides:
            self._drop(side, reset=True)
        self.close()

    def lost(self, side):
        """`side` failed (reset, broken pipe): reset the other one too, after what it has
        (chunks still in the worker included)."""
        self.ending = self.ending or ('rst', 'RST from the %s' % side.name)
        self._drop(side)
        if self.jobs:
            return self._run_for(None, self._reset_after, (side.peer,))
        self._reset_after(side.peer)

    def _reset_after(self, side):
        side.inlet._end(_RST)
        self._in_loop(self._close, None)   # not closed by the fault being called, if any

    def connect_backend(self):
        """Start connecting to the backend (once); what is sent there waits meanwhile.
        In the pump (where the opening and `Side._send_at` run)."""
        backend = self.backend
        if backend.sock is None and not backend.connecting and not backend.broken:
            backend.connecting = True
            self.proxy.resolve_distant(self._connect_first)
            if backend.connecting:   # not done at once, as a local backend's connect is
                self.connect_timer = self.pump.call_later(self.proxy.connect_timeout,
                                                          self._connect_expired)

    def current(self):
        """The handler in force and its settings: the one set, else the one drawn."""
        fixed = self.proxy.fixed
        if fixed is not None:
            return fixed
        handler = self.proxy.handlers[self.drawn]
        return handler, handler.settings

    @_in_pump
    def kill(self):
        """End the connection at once (from any thread): a side holding bytes is reset."""
        self.ending = self.ending or ('killed', 'ended by the proxy (disable, stop)')
        self._release()

    # -- opening ------------------------------------------------------------------

    def open(self):
        """Start the connection under the handler in force and the faults that apply to
        it: their on_connect hooks, in that order, then the backend."""
        _prepare(self.client.sock, nodelay=False)   # inherited from the listener
        handler, settings = self._in_force()
        starts = [(handler, settings, handler.name, None)]
        for fault in self.applied_faults:
            starts.append((fault.handler, fault.settings, fault.name, fault))
        runner = None     # the hooked handler the hooks run as: the first blocking one, if any
        for start in starts:
            hooked = start[0]
            if hooked.on_connect is not None and (
                    runner is None or hooked.blocking and not runner.blocking):
                runner = hooked
        if runner is None:
            self._opened(starts, None)
        else:
            self._run_for(runner, self._on_connect, (starts,))
        self.pump.dirty.add(self)

    def _on_connect(self, starts):
        result = None
        for handler, settings, name, fault in starts:
            if handler.on_connect is not None and result is not False and not self.released:
                result = self._call_as(fault, handler.on_connect, self.client, self.backend,
                                       name, settings, self.proxy)
        self._in_loop(self._opened, starts, result)

    def _opened(self, starts, result):
        if result is False:
            return self.close()
        if self.closing_at is not None:
            return
        for handler, settings, _, fault in starts:
            if handler.backend is not True and not self._call_as(
                    fault, handler.needs_backend, self, settings):
                return
        self.connect_backend()

    # -- faults: layers between the handler and each socket ---------------------------

    def add_fault(self, fault):
        """Lay `fault` on this connection, where it stands in its proxy's stack, and draw
        whether it applies (in the pump)."""
        if self.chains is None:
            self.chains = ([Layer(self, None, False)], [Layer(self, None, True)])
            self.client.inlet, self.backend.inlet = self.chains[0][0], self.chains[1][0]
        applied = self._draw(fault)
        order = self.proxy.fault_stack
        above = order.index(fault)
        for to_backend in fault.streams:
            chain = self._pruned(self.chains[to_backend])
            index = next((index for index, layer in enumerate(chain) if index and not
                          layer.removed and order.index(layer.fault) > above), len(chain))
            chain.insert(index, Layer(self, fault, to_backend, applied))
            self._link(chain)
        self.pump.dirty.add(self)    # settled anew: no chunk may pass its layers by

    def updated(self, fault, redraw):
        """`fault` was changed: the data its layers hold goes on at once (as a Toxiproxy
        toxic, changed, lets go of the chunk in hand; a close they delay keeps its time),
        and what comes next meets the new settings.  With `redraw` (its toxicity
        changed), whether it applies is drawn again."""
        applied = self._draw(fault) if redraw else None
        for layer in self._layers_of(fault):
            layer.let_go()
            if redraw:
                layer.applied = applied
                if not applied:
                    layer.release_eof()     # passing from now on: the EOF it held too
        self.pump.dirty.add(self)    # what they let go of may resume the reading
        self.met_live(fault)

    def met_live(self, fault):
        """`fault` was laid on, or changed on, this open connection: its on_live hook,
        if it has one and applies here."""
        hook = fault.handler.on_live
        if hook is None or self.closing_at is not None or self.released or not any(
                layer.applied for layer in self._layers_of(fault)):
            return
        self._run_for(fault.handler, self._call_as, (
            fault, hook, self.client, self.backend, fault.name, fault.settings, self.proxy))

    def _layers_of(self, fault, every=False):
        """The layers of `fault`, both ways (`every`: all the layers)."""
        return [layer for chain in self.chains or () for layer in chain
                if every or fault is not None and layer.fault is fault]

    def remove_fault(self, fault):
        """Take `fault`'s layers out: what they hold goes on at once, in order.

        A layer with a call in the worker stays in its chain, passing what
        reaches it on, so that nothing overtakes what that call sends; it is
        taken out at a later change, once no call is in the worker.
        """
        for layer in self._layers_of(fault):
            layer.remove()
        for chain in self.chains or ():
            self._link(self._pruned(chain))
        if fault.closes_when_removed and fault in self.applied_faults:
            self.close()
        self.pump.dirty.add(self)

    def _pruned(self, chain):
        """`chain` without its removed layers, unless a call is in the worker."""
        if not self.jobs:
            chain[:] = [layer for layer in chain if not layer.removed]
        return chain

    def _draw(self, fault):
        applied = fault.applies(self)
        if applied and fault not in self.applied_faults:
            fault.touched += 1
            self.applied_faults += (fault,)
            if fault.handler.on_close is not None:
                self._closes_with(fault.handler, fault.name, fault)
        return applied

    @staticmethod
    def _link(chain):
        for layer, after in zip(chain, chain[1:] + [chain[0].side]):
            layer.next = after

    def _connect_first(self, addresses, error):
        if self.closing_at is not None or self.released:
            return self._backend_failed(None)
        if error is not None:
            return self._backend_failed(error)
        self.targets = list(addresses)
        self._connect_next(None)

    def _connect_next(self, error):
        """Try the next address of the backend; with none left, fail with `error`."""
        backend = self.backend
        if backend.sock is not None:     # the attempt before failed
            self._unwatch(backend)
            backend.sock.close()
            backend.sock = None
        if not self.targets:
            return self._backend_failed(error)
        family, address = self.targets.pop(0)
        try:
            # socket.socket's Python layer (its __init__, close, repr) is no use here
            sock = socket.SocketType(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self.pump.starved(exc, 'new connections are reset')
                self.targets = None
                self._drop(self.client, reset=True)
                return self._backend_failed(None)
            return self._connect_next(exc)
        _prepare(sock, nodelay=True)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            sock.close()
            return self._connect_next(OSError(code, os.strerror(code)))
        backend.sock = sock
        if code == 0 or _established(sock):   # a local backend: no round to wait for
            self._backend_up(backend)
        self.pump.dirty.add(self)

    def _connected(self, side):
        """The selector's call: the backend's connect is done, or failed."""
        code = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self._connect_next(OSError(code, os.strerror(code)))
        self._backend_up(side)

    def _backend_up(self, side):
        side.connecting, self.targets = False, None
        if self.connect_timer is not None:
            self.pump.cancel(self.connect_timer)
            self.connect_timer = None
        if self.proxy.outage is not None:
            self.proxy.backend_answers()
        self._flush(side)

    def _connect_expired(self):
        """The connect timeout, for resolving and every address tried: the backend failed."""
        if self.backend.connecting and not self.released:
            self.targets = None
            self._connect_next(socket.timeout('timed out after %g s' % self.proxy.connect_timeout))

    def _backend_failed(self, error):
        backend = self.backend
        backend.connecting = False
        self._drop(backend)
        if error is not None:
            self.ending = ('unreachable', 'backend unreachable (%s)' % (
                getattr(error, 'strerror', None) or error))
            self.proxy.backend_fails(error)
        self.close()

    # -- events -----------------------------------------------------------------

    def on_event(self, side, mask, data=None):
        """The selector's call: `side`'s socket is readable or writable (`data`: what
        `Side._read_quickly` read from it, for the general way).

        A chunk read and relayed at once changes nothing the selector
        watches: the connection is settled only after other events (what
        queues, closes or drops marks it itself).
        """
        if self.released:    # an event of the round in which the connection ended
            return
        try:
            if side.connecting:
                self._connected(side)
            elif mask == selectors.EVENT_READ:
                if not self._read(side, data):
                    return
            else:
                if mask & selectors.EVENT_WRITE and side.events & selectors.EVENT_WRITE:
                    self._flush(side)
                if mask & selectors.EVENT_READ and not side.broken:
                    self._read(side)
        except Exception:
            return self.failed_in_pump()
        self.pump.dirty.add(self)

    def failed_in_pump(self):
        """A bug of ours, met handling an event: logged, and this connection ends (the
        others go on)."""
        log.exception('connection #%d from %s failed', self.index,
                      format_address(self.address))
        self._release()
        self.pump.dirty.add(self)

    def _reads_quickly(self):
        """Whether its sides whose reads are of the first size may be read the quick
        way: the connection is steady (not closing, no call in the worker) and
        `normal` is in force, and named (after a switch, the first chunk goes the
        general way, which names it).  Faults and a full peer are fine: its chunks
        go to its peer's inlet, as `_dispatch` sends them."""
        return (self.closing_at is None and not self.jobs and self.handler_name == 'normal'
                and self.current()[0].func is normal)

    def _read(self, side, data=None):
        """Read a chunk (unless `data` was read by `Side._read_quickly`) and hand it over;
        True when the connection must be settled."""
        if data is None:
            try:
                data = side.sock.recv(side.chunk)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return self.lost(side) or True
        settle = not data
        if len(data) == side.chunk and side.chunk < MAX_CHUNK:
            side.chunk *= 2      # bulk: fewer, larger reads (not the quick way's)
            settle = True
        elif len(data) < CHUNK and side.chunk > CHUNK:
            side.chunk = CHUNK   # small messages: no large buffer to allocate
            settle = True
        if not data:
            side.eof_read = True
        elif self.first is None:
            self.saw_first(side, data)
        if self.closing_at is None:
            self._dispatch(side, data)
        elif data:    # a peer still talking is drained, so that no RST hides our answer
            self.closing_at = max(self.closing_at, min(time.monotonic() + LINGER,
                                                       self.drain_until))
        return settle

    def saw_first(self, side, data):
        """Keep who spoke first, and how: the protocol, for `errors`."""
        self.first = (side is self.client, bytes(data[:FIRST_BYTES]))

    def protocol(self):
        """The protocol this connection's first bytes showed, or None (none yet, or raw).

        A client's first line (HTTP, Redis, memcached) or packet (PostgreSQL);
        or, when the backend spoke first, its greeting (MySQL, SMTP).
        """
        if self.first is None:
            return None
        from_client, data = self.first
        if from_client:
            protocol = detect_protocol(data, final=False)
            return None if protocol == 'raw' else protocol
        return detect_greeting(data)

    def _dispatch(self, side, data):
        """Give `data` to the handler in force: in the pump, or in the worker.

        While the worker still has calls whose effects are not all in, every
        chunk goes there too, whatever the handler: bytes keep their order
        when a handler is switched from blocking to non-blocking.
        """
        handler = self.current()[0]
        if handler.func is normal and not self.jobs:   # the fast way
            if self.handler_name != 'normal':   # set since: settled, it may be read
                self.handler_name = 'normal'    # the quick way
                self.pump.dirty.add(self)
            if data:
                side.peer.inlet.sendall(data)
            else:   # shutdown(), without its hand-over: this is the pump
                side.peer.inlet._end_in_pump(_EOF)
        elif handler.blocking or self.jobs:
            self._run_for(handler, self._handle, (side, data), side.peer.inlet,
                          _held_size(data))
        else:
            self._handle(side, data)

    def _handle(self, side, data):
        if self.released:    # killed while this chunk waited in the worker
            return
        handler, settings = self._in_force()
        side.data, dest = data, side.peer.inlet
        result = self._call_as(None, handler.func, side, dest, side is self.client,
                               handler.name, settings, self.proxy)
        side.data = None
        if result is False:
            self.close()
        elif not data and not (isinstance(result, str) and result == HOLD_EOF):
            dest.shutdown()

    def _warn_slow(self, fault, seconds):
        """Once per handler: a call of `fault`'s (None: of the handler in force) held
        the pump up."""
        handler = fault.handler if fault else self.current()[0]
        if not handler.warned:
            handler.warned = True
            log.warning('handler %s took %.0f ms in the pump, holding every connection up: '
                        'use sendall(data, delay=...) to delay data, or mark a handler that '
                        'must block with @traits(blocking=True)',
                        fault.name if fault else handler.name, seconds * 1000)

    def _run_for(self, handler, function, args, dest=None, size=0):
        """Call `function(*args)` now, or in the worker when `handler` may block.

        `handler` None means the worker, whatever the handler.  `size` is what
        the call holds for `dest`, the Side or Layer its bytes enter (as it is
        when handed over): it counts against HIGH_WATER for the Side that chain
        ends at until the call is done, and an end from outside meanwhile
        resets that Side, unless `dest` had its end already (then what the
        call sends is dropped).  A first fault laid meanwhile makes a new
        inlet, which the call sends to instead: then the Side may be reset
        where its stream was whole, never the other way round.
        """
        if handler is not None and not (handler.blocking or self.jobs):
            return function(*args)
        if self.worker is None:
            self.worker = _Worker()
        self.jobs += 1
        if dest is not None:
            dest.pending += size
            dest.side.held += size
        self.pump.dirty.add(self)    # what it holds may stop the reading
        try:
            self.worker.submit(self._job, function, args, dest, size)
        except RuntimeError as exc:
            self._job_done(dest, size)
            log.error('connection #%d: no thread for its handler (%s); closing it',
                      self.index, exc)
            self.close()

    def _job(self, function, args, dest, size):
        """A worker's call; its effects reach the pump before the news that it is done."""
        try:
            function(*args)
        except Exception:
            log.exception('connection #%d failed in its handler thread', self.index)
            self.close()
        finally:
            self.pump.call_soon(self._job_done, dest, size)

    def _job_done(self, dest, size):
        self.jobs -= 1
        if dest is not None:
            dest.pending -= size
            dest.side.held -= size
        if self.released:
            if not self.jobs:
                self._unlink()
        else:
            self.pump.dirty.add(self)

    def _in_loop(self, function, *args):
        if self.pump.in_loop():
            return function(*args)
        self.pump.call_soon(function, *args)

    def _timer(self, key, function, blocking, armed):
        del self.timers[key]
        fault = armed if isinstance(armed, Fault) else None
        if self.closing_at is not None or self.released or not (
                fault.active if fault else self.current()[0] is armed):
            return
        if blocking and self.worker is not None:
            self._run_for(None, self._fire, (fault, function))
        else:
            self._call_as(fault, function)
        self.pump.dirty.add(self)

    def _fire(self, fault, function):
        """A timer's call in the worker: the connection may have ended while it waited."""
        if self.closing_at is None and not self.released:
            self._call_as(fault, function)

    def _call_as(self, fault, function, *args):
        """Call a handler, hook or timer of `fault` (None: of the handler in force): what
        it arms, and the epoch it counts from, are the fault's.

        Its failure resets this connection's client only: a reset, not an
        EOF, so that a truncated answer never passes for a whole one.
        """
        holder = self if self.worker is None or self.pump.in_loop() else self.worker
        calling, holder.calling = holder.calling, fault
        timed = holder is self and id(function) not in _NEVER_SLOW     # in the pump
        if timed:
            started, before = time.perf_counter(), self.call_time
        try:
            return function(*args)
        except Exception:
            return self.failed(fault)
        finally:
            holder.calling = calling
            if timed:   # its own time: less that of the faults after it its sends called
                elapsed = time.perf_counter() - started
                own = elapsed - (self.call_time - before)
                if own > SLOW_CALL:
                    self._warn_slow(fault, own)
                self.call_time = before + elapsed

    def failed(self, fault):
        """A call of `fault` (None: of the handler in force) raised: logged, and the
        client reset.  False, what the call is taken to have returned."""
        log.exception('handler %s failed on connection #%d; resetting it',
                      fault.name if fault else self.handler_name, self.index)
        self.abort(self.client)
        return False

    def _in_force(self):
        handler, settings = self.current()
        self.handler_name = handler.name
        if handler.on_close is not None:
            self._closes_with(handler, handler.name)
        return handler, settings

    def _closes_with(self, handler, name, fault=None):
        """Call `handler`'s on_close hook, as `name` (of `fault`, if any), when the
        connection ends."""
        if self.closers is None:
            self.closers = {}
        self.closers.setdefault((handler, name), fault)

    def _flush(self, side):
        now = time.monotonic()
        queue = side.queue
        while queue and queue[0][0] <= now and not side.broken:
            data = queue[0][1]
            if data is _RST:
                return self._drop(side, reset=True)
            if data is _EOF:
                queue.popleft()
                with contextlib.suppress(OSError):
                    side.sock.shutdown(socket.SHUT_WR)
                side.eof_sent = True
                continue
            entry = queue[0]
            paced = len(entry) > 2
            if paced and not entry[3]:    # a new piece: its size, and the pause after it
                size, entry[4] = entry[2](len(data))
                entry[3] = max(1, int(size))
            try:
                sent = side.sock.send(memoryview(data)[:entry[3]] if paced else data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self.lost(side)
            side.queued -= sent
            side.delivered += sent
            if paced:
                entry[3] -= sent
            if sent < len(data):
                entry[1] = memoryview(data)[sent:]
                if not paced or entry[3]:
                    return                # the socket is full: wait until it is writable
                entry[0] = now + entry[4]   # a whole piece went out: the next one waits
                continue
            queue.popleft()
            side.queued -= ENTRY_COST
            if paced:   # the pause after the last piece holds what follows, queued or not
                side.last_due = max(side.last_due, now + entry[4])
                if queue:
                    queue[0][0] = max(queue[0][0], now + entry[4])
        if not queue:
            if side.last_due <= now:     # no pause holds what follows: sendall's quick way
                side.last_due = 0.0
            if self.closing_at is not None:   # flushed: now linger
                self.closing_at = max(self.closing_at, now + LINGER)

    # -- settling: what the pump does with a connection touched in a round -------------

    def settle(self):
        """Watch what is to be watched, plan the next wake-up, or end the connection."""
        if self.released:
            return
        if self._finished():
            return self._release()
        now = time.monotonic()
        self.settled = self.proxy.handling
        quick = self._reads_quickly()
        self._watch(self.client, now, quick)
        self._watch(self.backend, now, quick)
        moment = self._next_moment(now)
        timer = self.wake_timer
        if moment is not None and (timer is None or moment < timer[0]):
            if timer is not None:     # a later one: it would hold the connection till then
                self.pump.cancel(timer)
            self.wake_timer = self.pump.call_at(moment, self._wake)

    def _watch(self, side, now, quick):
        events = 0
        if side.sock is not None and not side.broken:
            if side.connecting:
                events = selectors.EVENT_WRITE
            else:
                if not side.eof_read and (self.closing_at is not None or
                                          side.peer.waiting() < HIGH_WATER):
                    events = selectors.EVENT_READ
                if side.queue and side.queue[0][0] <= now:
                    events |= selectors.EVENT_WRITE
                if not events and side.eof_read:
                    self.pump.probe_later(self)
        callback = side.on_event
        if events == selectors.EVENT_READ and quick and side.chunk == CHUNK:
            callback = side._read_quickly
            side.direct = side.peer.takes_directly()
        if events == side.events and (callback == side.callback or not events):
            return
        selector = self.pump.selector
        if not side.events:
            selector.register(side.sock, events, callback)
        elif not events:
            selector.unregister(side.sock)
        else:   # the same events, another callback: no system call
            selector.modify(side.sock, events, callback)
        side.events, side.callback = events, callback

    def _unwatch(self, side):
        if side.events:
            self.pump.selector.unregister(side.sock)
            side.events = 0

    def _next_moment(self, now):
        """When a delayed write falls due or the linger ends: the next wake-up, if any."""
        if self.closing_at is None and not (self.client.queue or self.backend.queue):
            return None
        moments = [side.queue[0][0] for side in self.sides
                   if side.queue and side.queue[0][0] > now and not side.broken]
        if self.closing_at is not None and self.closing_at > now:
            moments.append(self.closing_at)
        return min(moments) if moments else None

    def probe(self):
        """The pump's look, every PROBE_EVERY, at a connection with a socket whose EOF
        was read, and so not watched: a reset received since (the peer aborted after
        its FIN) is relayed as a reset, as one met reading."""
        if self.released:
            return
        for side in self.sides:
            if side.eof_read and not side.broken and not side.events and side.sock is not None \
                    and _reset_pending(side.sock):
                self.lost(side)
        self.pump.dirty.add(self)     # settled: probed again if it still has such a socket

    def _wake(self):
        self.wake_timer = None
        for side in self.sides:
            if side.queue and side.sock is not None and not side.connecting:
                self._flush(side)
        self.pump.dirty.add(self)

    def _finished(self):
        """Whether the connection ends: each live side sent us its EOF (and, closing, got
        ours) and has nothing left to get, or, closing, its linger is over."""
        closing = self.closing_at is not None
        if not closing and (self.jobs or not (self.client.eof_read or self.backend.eof_read)):
            return False          # the steady state, said quickly
        ended = True
        for side in self.sides:   # a loop, not all(): this runs for every connection
            if side.broken or side.sock is None and not side.connecting:
                continue          # not live
            if side.queue or side.staged:
                return False      # what was queued goes out first, however slowly
            ended = ended and side.eof_read and (side.eof_sent or not closing)
        return ended or closing and time.monotonic() >= self.closing_at

    def _drop(self, side, reset=False):
        """Close `side`'s socket now (with an RST if `reset`); its queue is lost."""
        if side.sock is not None and not side.broken:
            self._unwatch(side)
            if reset:
                _reset(side.sock)
            else:
                side.sock.close()
        side.broken = side.eof_read = side.eof_queued = side.eof_sent = True
        side.queue = _NO_QUEUE
        side.queued = 0
        if not self.released:
            self.pump.dirty.add(self)

    def _release(self):
        if self.released:
            return
        self.released = True
        if self.ending is None:
            client, backend = self.sides
            clean = (client.eof_read or client.sock is None) and (
                backend.eof_read or backend.sock is None)
            self.ending = ('eof', 'EOF both ways') if clean else (
                'no_eof', 'closed after %g s without EOF' % LINGER)
        for timer in (self.connect_timer, self.wake_timer):
            if timer is not None:
                self.pump.cancel(timer)
        self.pump.probed.discard(self)
        for timer in (self.timers or {}).values():
            self.pump.cancel(timer)     # nothing holds an ended connection
        cut = (self._bytes_wait_for(self.client), self._bytes_wait_for(self.backend))
        for chain in self.chains or ():
            for layer in chain:
                layer.stop()
        try:
            for side, reset in zip(self.sides, cut):   # a cut stream: never a clean EOF
                self._drop(side, reset=reset)
            for (handler, name), fault in (self.closers or {}).items():
                self._run_for(handler, self._call_as,
                              (fault, handler.on_close, self, name, self.proxy))
        finally:
            self.pump.restock()
            self.proxy.forget(self)
        self.proxy.ended(self)
        if not self.jobs:   # else when the worker is done: no call can come in any more
            self._unlink()

    def _bytes_wait_for(self, side):
        """Whether bytes, not only an end, wait to be sent to `side`: queued there, in a
        fault layer on the way, or in the worker (in calls that send to a layer, or to
        `side`, which has not had its end yet: else what they send is dropped)."""
        stage = side.inlet
        while True:
            if stage.pending and not stage.eof_queued:
                return True
            if stage.queue and any(_size(entry[1]) for entry in stage.queue):
                return True
            if stage is side:
                return False
            stage = stage.next

    def _unlink(self):
        """Break the cycles between the ended connection, its sides and its layers: it
        is freed at once, not by the cyclic garbage collector, which took a quarter of
        the pump's CPU on short connections.  A side a handler kept is left a husk:
        its `connection` is None, and its calls do nothing."""
        for side in self.sides:
            side.connection = side.peer = side.inlet = None
            side.callback = None
        self.chains = None

    def fault_names(self):
        """The names of the faults that apply to it (a new list: events keep it)."""
        return [fault.name for fault in self.applied_faults] if self.applied_faults else []

    def summary(self):
        """What the log, the events and GET /connections tell of this connection."""
        return {'proxy': self.proxy.name, 'connection': self.index,
                'client': format_address(self.address), 'handler': self.handler_name,
                'faults': self.fault_names(),
                'to_backend': self.backend.delivered, 'to_client': self.client.delivered,
                'seconds': round(time.monotonic() - self.opened, 3)}


_NONBLOCK = getattr(socket, 'SOCK_NONBLOCK', 0)   # Linux: a socket born non-blocking
_TCP_INFO = getattr(socket, 'TCP_INFO', None) if sys.platform.startswith('linux') else None
_TCP_ESTABLISHED = b'\x01'                         # Linux: TCP_INFO's tcpi_state
_CORK = getattr(socket, 'TCP_CORK', 0)             # Linux: hold segments until uncorked


#: How a connection ends, as metrics count it.
ENDINGS = ('eof', 'no_eof', 'closed', 'reset', 'rst', 'killed', 'unreachable')


class EventLog:
    """What happened, in a bounded ring: connections opened and closed, handlers and
    mixes changed.  Each event has an id, growing: read the ones after `since`.

    A connection's events are kept as tuples, made into dicts when read: they
    are recorded in the pump, for every connection.
    """

    CONNECTION = ('proxy', 'connection', 'client', 'handler', 'faults')
    CLOSED = CONNECTION + ('to_backend', 'to_client', 'ended', 'how', 'seconds')

    def __init__(self, size=10000):
        self.events = collections.deque(maxlen=size)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()     # ids in the ring in their order, from any thread

    def record(self, kind, proxy, fields):
        """`fields`: a dict, or the values of CONNECTION (opened) or CLOSED (closed)."""
        with self.lock:
            self.events.append((next(self.ids), time.time(), kind, proxy, fields))

    def since(self, since=0, proxy=None):
        return [self._as_dict(event) for event in list(self.events)
                if event[0] > since and proxy in (None, event[3])]

    def oldest(self):
        """The id of the oldest event held (0: none): a reader whose `since` + 1 is
        below it has missed events the ring dropped."""
        with self.lock:
            return self.events[0][0] if self.events else 0

    def _as_dict(self, event):
        number, when, kind, proxy, fields = event
        if not isinstance(fields, dict):
            fields = dict(zip(self.CONNECTION if kind == 'opened' else self.CLOSED, fields))
            fields['client'] = format_address(fields['client'])
            if kind == 'closed':   # rounded here, not in the pump: round() is slow
                fields['seconds'] = round(fields['seconds'], 3)
        return dict(fields, id=number, time=round(when, 6), event=kind, proxy=proxy)


EVENTS = EventLog()     # the process's: every proxy records there


def _prepare(sock, nodelay):
    """Make a relayed socket non-blocking, with Nagle off if `nodelay`."""
    if sock.gettimeout() != 0:
        sock.setblocking(False)
    if nodelay:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:   # Nagle on only costs some latency
            pass


def _established(sock):
    """Whether a connect still "in progress" is done: on loopback it is, as a rule.
    On Linux, asked of TCP_INFO's first byte, the state: getpeername() would
    format an address."""
    try:
        if _TCP_INFO is not None:
            return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1) == _TCP_ESTABLISHED
        sock.getpeername()
    except OSError:       # not yet, or no TCP_INFO here: the selector tells
        return False
    return True


def _reset_pending(sock):
    """Whether `sock` got a reset (or another hard error): poll()'s POLLERR, which a
    soft error (an ICMP message that TCP rides out) does not raise, unlike SO_ERROR
    on Linux.  Where there is no poll(), SO_ERROR."""
    if not hasattr(select, 'poll'):
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _reset(sock):
    """Close `sock` with an RST (SO_LINGER on, zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    sock.close()


# ---------------------------------------------------------------------------
# The proxy server
# ---------------------------------------------------------------------------

def parse_address(text, what='address'):
    """``host:port`` (or ``[v6]:port``) into (host, port); port 0 is ephemeral."""
    host, sep, port = str(text).strip().rpartition(':')
    host = host.strip('[]')
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError('%s %r is not HOST:PORT (like localhost:8000)' % (what, text))
    return _checked_host(host, what), int(port)


def _checked_host(host, what):
    """`host`, if the resolver can be asked about it: labels of 1 to 63 characters."""
    try:
        host.encode('idna')
    except UnicodeError:
        raise ConfigError('%s: %s is no host name (labels of 1 to 63 characters, dots '
                          'between them)' % (what, shown(host))) from None
    return host


def _distant_option(value):
    """The backend's (host, port): port 0 is refused."""
    distant = _address_option(value, 'distant')
    if distant[1] == 0:
        raise ConfigError('distant %s: port 0 is no backend\'s port' % format_address(distant))
    return distant


def _address_option(value, what):
    """'host:port' or (host, port) as (host, port); anything else is a ConfigError."""
    if isinstance(value, str):
        return parse_address(value, what)
    if isinstance(value, (tuple, list)) and len(value) >= 2 and isinstance(value[0], str) \
            and isinstance(value[1], int) and 0 <= value[1] < 65536:
        return _checked_host(value[0], what), value[1]
    raise ConfigError('%s = %s: expected HOST:PORT, like localhost:8000, or (host, port)'
                      % (what, shown(value)))


def listen_error(exc, address, flag):
    """`exc`, an OSError of bind(), saying where, and for a port taken what to do."""
    hint = ''
    if exc.errno == errno.EADDRINUSE:
        hint = ' (another program listens there: give port 0 for a free port, as %s, ' \
               'or another port)' % flag
    return OSError(exc.errno, 'cannot listen on %s: %s%s' % (
        format_address(address), exc.strerror or exc, hint))


def _plain_ip(host):
    """An IP address, its zone left out and an IPv4-mapped IPv6 one as IPv4."""
    address = ipaddress.ip_address(host.split('%')[0])
    return getattr(address, 'ipv4_mapped', None) or address


def _is_local(family, host):
    """Whether `host` is an address of this machine (one it can bind)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


def format_address(address):
    host, port = address[:2]
    return '[%s]:%d' % (host, port) if ':' in host else '%s:%d' % (host, port)


def _is_ip(host):
    """Whether `host` is an IPv4 or IPv6 address, not a name to resolve."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False


def _family(address):
    try:
        return socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ConfigError('cannot resolve %s: %s' % (address[0], exc.strerror)) from None


class _Driving:
    """What the in-process Proxy and the Client share: scoped faults."""

    @contextlib.contextmanager
    def with_handler(self, name, /, **settings):
        """Set handler `name` for the block, then restore exactly what was there."""
        previous = self.get_handler()
        self.set_handler(name, **settings)
        try:
            yield self
        finally:
            self.restore(previous)

    @contextlib.contextmanager
    def with_behavior(self, spec):
        """Set the behavior mix for the block, then restore what was there."""
        previous = self.get_handler()
        self.set_behavior(spec)
        try:
            yield self
        finally:
            self.restore(previous)

    @contextlib.contextmanager
    def fault(self, handler, /, **options):
        """Stack a fault for the block (add_fault's arguments), then remove it."""
        added = self.add_fault(handler, **options)
        try:
            yield added
        finally:
            with contextlib.suppress(FaultNotFound):    # removed in the block: gone anyway
                self.remove_fault(added['name'])

    @contextlib.contextmanager
    def faults(self, *faults):
        """Stack several faults for the block, in order, then remove them: each a
        handler's name, or a dict of add_fault's arguments with "handler"."""
        with contextlib.ExitStack() as stack:
            added = []
            for spec in faults:
                options = {'handler': spec} if isinstance(spec, str) else dict(spec)
                if 'handler' not in options:
                    raise ConfigError('a fault is a handler name or a dict with "handler", '
                                      'not %s' % shown(spec))
                added.append(stack.enter_context(self.fault(options.pop('handler'),
                                                            **options)))
            yield added

    @contextlib.contextmanager
    def down(self):
        """Refuse connections during the block (as a stopped server), then accept again."""
        self.disable()
        try:
            yield self
        finally:
            self.enable()


class Proxy(_Driving, socketserver.ThreadingTCPServer):
    """The chaos proxy: accepts on `local`, relays to `distant` through handlers.

    Binding and relaying start here, so ``address`` is known at once (port 0
    binds an ephemeral port) and no client waits on a proxy never started.
    ``start()`` also serves the control API when asked; ``stop()`` ends it
    all; the proxy is also a context manager.  In a test::

        with Proxy('127.0.0.1:0', 'localhost:6379') as proxy:
            with proxy.with_handler('delay', sleep=0.5):
                ...
    """

    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 65535   # the kernel caps it (somaxconn: 4096 on recent Linux), as
                                 # for Go's listeners; socketserver's 5 drops SYNs of a burst

    def __init__(self, local, distant, behavior='100:normal',
                 handlers=None, seed=None, http=False, http_host='localhost', http_port=8080,
                 http_token=None, connect_timeout=CONNECT_TIMEOUT, max_connections=0,
                 name='default'):
        connect_timeout, max_connections, seed, http_token = (
            _convert_option(key, value, key) if value is not None else None for key, value in (
                ('connect_timeout', connect_timeout), ('max_connections', max_connections),
                ('seed', seed), ('http_token', http_token)))
        if not _good_name(name):
            raise ConfigError('a proxy name is %s, not %s' % (_GOOD_NAME, shown(name)))
        self.name = name
        local = _address_option(local, 'local')
        self.distant = _distant_option(distant)
        self.handlers = default_handlers()
        if handlers is not None and not isinstance(handlers, dict):
            raise ConfigError('handlers= takes {name: function}, not %s' % shown(handlers))
        for name, handler in (handlers or {}).items():
            self.register(name, handler)
        self.behavior = Behavior(behavior, self.handlers)
        self.seed = seed
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.fixed = None                 # (Handler, settings) set through the API
        self.fault_stack = []             # Faults on top of it, in order (changed in the pump)
        self.epoch = (0, time.monotonic())  # (accepted, time) of the last change
        self.handling = object()   # new whenever live connections' handler may change
        self.enabled = True
        self.control_server = None
        self._control_options = (http_host, http_port, http_token) if http else None
        self._random = random.Random(seed)
        self._accepted = 0
        self._connections = set()          # changed in the pump only; read whole (len, list)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # notified when no connection is left
        self._accepting = False            # the listener is watched by the pump
        self._refusal = None               # the pump timer that ends a refuse_for()
        self._stopped = threading.Event()  # what serve_forever() waits for
        self._addresses = None             # (the backend's addresses, when resolved)
        self.outage = None                 # [since, connections failed, first error]
        self.counts = dict.fromkeys(ENDINGS + ('to_backend', 'to_client'), 0)   # of ended
        self.by_handler = {}               # connections: bytes, how, their last handler
        self.connection_log_level = logging.DEBUG   # of each connection's opened/closed line
        self._resolving = []               # callbacks waiting for them
        self.address_family = _family(local)
        self.pump = shared_pump()
        self._lifecycle = threading.Lock()   # of control_server: start(), stop() at once
        super().__init__(local, None)
        _SERVERS.add(self)
        try:
            self._check_not_itself()
            self.pump.call(self._listen)    # accepting from now on: no client waits
        except BaseException:
            self.server_close()
            raise

    # -- life cycle: everything that touches the listener runs in the pump -----------

    @property
    def address(self):
        """The (host, port) the proxy listens on."""
        return self.server_address[:2]

    @property
    def control(self):
        """The (host, port) of the control API, or None without one (or before start())."""
        return self.control_server.server_address[:2] if self.control_server else None

    def client(self, timeout=5.0):
        """A Client of this proxy's control API (with http=True, once started)."""
        if self.control is None:
            raise VaurienError('this proxy serves no control API: give http=True, and '
                               'start() it')
        return Client(*self.control, timeout=timeout,
                      token=self._control_options[2] if self._control_options else None)

    def start(self):
        """Serve (with the control API if asked) and return self; again: no-op.

        Started after stop(), the proxy listens again on the same address.
        """
        if self.pump.forked:
            self.pump.refuse_forked()
        try:
            self._serve_control()
        except BaseException:
            self.stop()      # it relays since its creation: nothing is left behind
            raise
        self._stopped.clear()
        self.pump.call(self._start)
        return self

    def _serve_control(self):
        """Start the control API, if asked and not yet started (once, whatever the
        threads calling start() at once)."""
        with self._lifecycle:
            if self._control_options and self.control_server is None:
                self.control_server = ControlServer(self, *self._control_options)
                threading.Thread(target=self.control_server.serve_forever, args=(0.05,),
                                 name='vaurien-control', daemon=True).start()

    def _start(self):
        if self._refusal is None:    # a refusal in course reopens the listener itself
            self._listen()

    def stop(self, timeout=2.0):
        """Stop accepting, close every connection and the control API.

        Waits up to `timeout` seconds in all for the connections to end.
        """
        if self.pump.forked:    # its control API's thread is not here: no waiting on it
            self.pump.refuse_forked()
        with self._lifecycle:    # one thread ends the control API, whatever the others do
            server, self.control_server = self.control_server, None
        if server is not None:
            with server.lock:
                server.stopped = True     # its keep-alive callers too
            server.shutdown()
            server.server_close()
            for other in list(server.proxies.values()):
                if other is not self:        # made through the API, or named in a config
                    other.stop(timeout)
        self.disable()
        with self._lock:
            self._idle.wait_for(lambda: not self._connections, timeout)
        self._stopped.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def serve_forever(self, poll_interval=None):
        """socketserver's call: serve until stop() or shutdown() (the pump does the work)."""
        self.start()
        self._stopped.wait()

    def shutdown(self):
        """socketserver's call: stop serving, and end serve_forever()."""
        self.stop()

    def server_bind(self):
        """Bind; an error names the address, and what to do about it."""
        try:
            super().server_bind()
        except OSError as exc:
            raise listen_error(exc, self.server_address,
                               "local='HOST:0' or --local HOST:0") from None

    def get_request(self):
        """socketserver's call: accept a connection.  Not with socket.accept(), whose
        conversions of the family and type to enums cost more than the accept; and as a
        plain `socket.SocketType`, as every relayed socket is (see `_connect_next`)."""
        fd, address = self.socket._accept()
        return socket.SocketType(self.address_family, self.socket_type, 0, fd), address

    def server_activate(self):
        """Listen without blocking, with Nagle off: accepted sockets inherit TCP_NODELAY."""
        self.socket.setblocking(False)
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_activate()

    def _check_not_itself(self, local=None, distant=None):
        """Refuse a `distant` that is this very proxy (listening on `local`): each
        connection would open another one, until no descriptor is left."""
        local, distant = local or self.address, distant or self.distant
        host, port = distant
        if port != local[1]:
            return
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        bound = _plain_ip(local[0])
        for family, _, _, _, address in infos:
            target = _plain_ip(address[0])
            reaches = target.version == bound.version or (      # '::' takes IPv4 too
                bound.is_unspecified and bound.version == 6 and target.version == 4)
            if reaches and (target == bound or (bound.is_unspecified and _is_local(
                    socket.AF_INET if target.version == 4 else family, str(target)))):
                raise ConfigError('distant %s is this proxy itself (local %s): each connection '
                                  'would connect to the proxy again; give the backend\'s '
                                  'address' % (format_address(distant), format_address(local)))

    def server_close(self):
        self.pump.call(self._close_listener)

    def disable(self):
        """Refuse connections as a stopped server: close the listener and live connections.

        Returns the status, as Client.disable() does.
        """
        self.pump.call(self._disable)
        return self.status()

    def enable(self):
        """Listen again, on the same address; returns the status.

        Raises OSError when the address cannot be listened on (taken meanwhile).
        """
        self.pump.call(self._enable)
        return self.status()

    def refuse_for(self, seconds):
        """Refuse new connections for `seconds`, keeping live ones."""
        self.pump.call(self._refuse_for, seconds)

    def _refuse_for(self, seconds):
        if not self.enabled or self._refusal is not None:
            return
        self._close_listener()
        self._refusal = self.pump.call_later(seconds, self._end_refusal)

    def _end_refusal(self):
        self._refusal = None
        try:
            self._listen()
        except OSError as exc:
            log.error('%s; connections stay refused', exc.strerror or exc)

    def _cancel_refusal(self):
        if self._refusal is not None:
            self.pump.cancel(self._refusal)
            self._refusal = None

    def _disable(self):
        self._cancel_refusal()
        self._close_listener()
        for conn in self._live():
            conn.kill()

    def _enable(self):
        self._cancel_refusal()
        self._listen()

    def _close_listener(self):
        if self._accepting:
            self.pump.selector.unregister(self.socket)
            self._accepting = False
        self.enabled = False
        self.socket.close()

    def _listen(self):
        """Watch the listener, bound again first if it was closed."""
        if self._accepting:
            return
        if not self.enabled:
            self.socket = socket.socket(self.address_family, self.socket_type)
            try:
                self.server_bind()
                self.server_activate()
            except OSError:
                self.socket.close()
                raise
            self.enabled = True
        self.pump.selector.register(self.socket, selectors.EVENT_READ, self._on_acceptable)
        self._accepting = True

    # -- connections ---------------------------------------------------------------

    def _on_acceptable(self, mask):
        """The pump's call: accept what waits, through get_request, verify_request and
        process_request, as socketserver does."""
        for _ in range(self.pump.ACCEPT_BATCH):
            if not self._accepting:     # closed by a connection just opened (flap)
                return
            try:
                request, client_address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    continue        # the client left before we took it: next one
                self.pump.starved(exc, 'new connections are reset')
                if not self.pump.shed(self.socket):
                    return self._pause_accepting()
                continue
            if not self.verify_request(request, client_address):
                self.shutdown_request(request)
                continue
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def _pause_accepting(self, seconds=0.1):
        """Stop watching the listener for a moment: it stays readable while accept fails."""
        if self._accepting:
            self.pump.selector.unregister(self.socket)
            self._accepting = False
            self.pump.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self):
        if self.enabled and not self._accepting and self._refusal is None:
            self._listen()

    def process_request(self, request, client_address):
        """Draw the connection's handler, in accept order, and open it in the pump."""
        if self.max_connections and len(self._connections) >= self.max_connections:
            log.warning('refusing %s: %d connections open (--max-connections)',
                        format_address(client_address), len(self._connections))
            return _reset(request)
        conn = Connection(self, request, client_address, self._accepted,
                          self.behavior.draw(self._random))
        self._accepted += 1
        for fault in self.fault_stack:
            conn.add_fault(fault)
        handler = conn.current()[0].name
        EVENTS.record('opened', self.name, (self.name, conn.index, client_address, handler,
                                            conn.fault_names()))
        if log.isEnabledFor(self.connection_log_level):
            log.log(self.connection_log_level, 'connection #%d from %s opened: %s', conn.index,
                    format_address(client_address), handler)
        self._connections.add(conn)
        try:
            conn.open()
        except Exception:
            conn.kill()      # forgotten, its sockets closed; the error is logged
            raise

    def resolve_distant(self, callback):
        """Call ``callback(addresses, error)`` in the pump with the backend's addresses.

        A host name is resolved in a thread, so that the pump never waits on
        a name server, and reused for RESOLVE_TTL seconds; an IP address is
        used as it is.
        """
        if self._addresses is not None:
            addresses, until = self._addresses
            if time.monotonic() < until:
                return callback(addresses, None)
        self._resolving.append(callback)
        if len(self._resolving) > 1:
            return None
        distant = self.distant
        if _is_ip(distant[0]):
            return self._resolved(distant, *self._lookup(distant))
        try:
            threading.Thread(target=lambda: self.pump.call_soon(
                self._resolved, distant, *self._lookup(distant)), name='vaurien-resolve',
                daemon=True).start()
        except RuntimeError as exc:    # no thread to be had
            self._resolved(distant, None, exc, 0)

    @staticmethod
    def _lookup(distant):
        """(addresses, None) or (None, the error), and until when they hold."""
        host, port = distant
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:    # OSError, or UnicodeError for a label too long
            return None, exc, 0
        until = math.inf if _is_ip(host) else time.monotonic() + RESOLVE_TTL
        return [(info[0], info[4]) for info in infos], None, until

    def _resolved(self, distant, addresses, error, until):
        waiting, self._resolving = self._resolving, []
        if distant != self.distant:           # updated meanwhile: look the new one up
            for callback in waiting:
                self.resolve_distant(callback)
            return
        if addresses:
            self._addresses = (addresses, until)
        for callback in waiting:
            self.pump.guarded(callback, (addresses, error))

    def ended(self, conn):
        """The pump's call: `conn` ended: counted, recorded, logged."""
        kind, how = conn.ending
        counts = self.counts
        counts['to_backend'] += conn.backend.delivered
        counts['to_client'] += conn.client.delivered
        counts[kind] += 1
        self.by_handler[conn.handler_name] = self.by_handler.get(conn.handler_name, 0) + 1
        seconds = time.monotonic() - conn.opened
        EVENTS.record('closed', self.name, (
            self.name, conn.index, conn.address, conn.handler_name, conn.fault_names(),
            conn.backend.delivered, conn.client.delivered, kind, how, seconds))
        for fault in conn.applied_faults:
            fault.endings[kind] = fault.endings.get(kind, 0) + 1
        if log.isEnabledFor(self.connection_log_level):
            log.log(self.connection_log_level, 'connection #%d from %s closed: %s, %d B to '
                    'the backend, %d B to the client, %s, %.3f s', conn.index,
                    format_address(conn.address), conn.handler_name, conn.backend.delivered,
                    conn.client.delivered, how, seconds)

    def metrics(self):
        """Counts since the proxy started: connections (open, accepted, ended by how
        they ended and by their handler) and bytes each way (of ended connections)."""
        return {'proxy': self.name, 'open': self.connection_count, 'accepted': self._accepted,
                'to_backend': self.counts['to_backend'], 'to_client': self.counts['to_client'],
                'ended': {kind: self.counts[kind] for kind in ENDINGS},
                'handlers': dict(self.by_handler),
                'faults': {fault.name: {'connections': fault.touched, 'ended': dict(
                    fault.endings)} for fault in list(self.fault_stack)}}

    def backend_fails(self, error):
        """A connection found the backend unreachable: one line per outage, not per
        connection."""
        if self.outage is None:
            self.outage = [time.monotonic(), 0, error]
            log.warning('backend %s unreachable (%s): connections are closed until it '
                        'answers again', format_address(self.distant),
                        getattr(error, 'strerror', None) or error)
        self.outage[1] += 1

    def backend_answers(self):
        """A connection reached the backend: the end of an outage, if there was one."""
        since, failed, _ = self.outage
        self.outage = None
        log.info('backend %s answers again, after %.1f s unreachable (%d connection%s '
                 'closed)', format_address(self.distant), time.monotonic() - since, failed,
                 '' if failed == 1 else 's')

    def forget(self, conn):
        self._connections.discard(conn)
        if not self._connections:
            with self._lock:
                self._idle.notify_all()

    def _live(self):
        return list(self._connections)

    @property
    def connection_count(self):
        return len(self._connections)

    def handle_error(self, request, client_address):
        log.exception('error while accepting %s', format_address(client_address))

    @staticmethod
    def get_data(source):
        """The chunk `source` delivered to the handler being called (b'' at EOF)."""
        data, source.data = source.data, b''
        return data

    # -- driving: the same calls as Client ---------------------------------------------

    def register(self, name, function, /, **settings):
        """Add handler `function` (or replace one) under `name`, with its settings;
        then set_handler(name) and set_behavior('20:NAME') find it."""
        if not isinstance(name, str) or not name:
            raise ConfigError('a handler is registered under a name (a string), not %s'
                              % shown(name))
        if isinstance(function, Handler):   # a copy: the original keeps its settings
            original, function = function, Handler(name, function.func)
            function.settings, function.origin = dict(original.settings), original.origin
        handler = function if isinstance(function, Handler) else Handler(name, function)
        if settings:
            handler.settings = handler.validate(settings)
        self.handlers[name] = handler
        self.handling = object()     # a live connection may have drawn `name`
        return handler

    def handler(self, name):
        """The registered Handler of `name`; a function is registered under its own name."""
        if callable(name):
            return self._registered(name)
        try:
            return self.handlers[name]
        except (KeyError, TypeError):
            raise ConfigError(unknown_handler(name, self.handlers)) from None

    def _registered(self, function):
        name = getattr(function, '__name__', None) or repr(function)
        known = self.handlers.get(name)
        if known is None:
            return self.register(name, function)
        if known.func is not function:
            raise ConfigError('another handler is registered as %r: register yours under a '
                              'name of its own, with proxy.register(NAME, function)' % name)
        return known

    def get_handler(self):
        """{"handler", "settings", "behavior", "fixed"}: what new chunks go through.

        "handler" is None while a mix of several handlers is in force; then
        "behavior" says which.
        """
        if self.fixed is not None:
            handler, settings = self.fixed
            return {'handler': handler.name, 'settings': dict(settings),
                    'behavior': str(self.behavior), 'fixed': True}
        single = self.behavior.single
        return {'handler': single,
                'settings': dict(self.handlers[single].settings) if single else {},
                'behavior': str(self.behavior), 'fixed': False}

    def set_handler(self, name, /, **settings):
        """Send every connection, live ones included, through handler `name`.

        `name` may be a handler function: it is registered under its own name.
        """
        return self.apply_handler(name, settings, 'a Python call')

    def apply_handler(self, name, settings, origin):
        """set_handler(), saying where the change came from: `origin` is logged."""
        handler = self.handler(name)
        self.fixed = (handler, handler.validate(settings))
        self._new_epoch()
        EVENTS.record('changed', self.name, {'handler': handler.name,
                                             'settings': dict(self.fixed[1]), 'by': origin})
        if log.isEnabledFor(logging.INFO):     # a switch costs a fraction of a ms: keep it so
            log.info('handler %s set, by %s (%s)', handler.name, origin,
                     _settings_text(self.fixed[1]))
        return self.get_handler()

    def restore(self, state, origin='a Python call'):
        """Put back what get_handler() returned: its mix, and its handler over it if
        "fixed".  Everything is checked before anything changes."""
        behavior = self.behavior if state.get('behavior') is None \
            else Behavior(state['behavior'], self.handlers)
        fixed = None
        if state.get('fixed', True):
            handler = self.handler(state.get('handler'))
            fixed = (handler, handler.validate(state.get('settings') or {}, warn=False))
        elif state.get('handler') not in (None, behavior.single) or \
                state.get('settings') not in (None, {}, self.handlers[behavior.single].settings
                                              if behavior.single else {}):
            raise ConfigError('with "fixed": false, the mix in "behavior" is put back, and '
                              '"handler" and "settings" are only what GET /handler gave with '
                              'it; to set a handler, give "fixed": true (or leave it out)')
        self.behavior, self.fixed = behavior, fixed
        self._new_epoch()
        EVENTS.record('changed', self.name, {'restored': self.get_handler(), 'by': origin})
        if log.isEnabledFor(logging.INFO):
            log.info('%s restored, by %s', 'handler %s (%s)' % (
                fixed[0].name, _settings_text(fixed[1])) if fixed else 'behavior %s' % behavior,
                origin)
        return self.get_handler()

    def list_handlers(self):
        return sorted(self.handlers)

    def get_behavior(self):
        """The mix drawn from, with what goes to normal: '20:delay,80:normal'."""
        return str(self.behavior)

    def set_behavior(self, spec):
        """Draw each new connection's handler from `spec`; drops a handler set."""
        return self.apply_behavior(spec, 'a Python call')

    def apply_behavior(self, spec, origin):
        """set_behavior(), saying where the change came from: `origin` is logged."""
        self.behavior = Behavior(spec, self.handlers)
        self.fixed = None
        self._new_epoch()
        EVENTS.record('changed', self.name, {'behavior': str(self.behavior), 'by': origin})
        log.info('behavior %s set, by %s', self.behavior, origin)
        return self.get_behavior()

    # -- faults: stacked on the handler or mix -------------------------------------------

    def add_fault(self, handler, /, name=None, direction=None, toxicity=1.0, index=None,
                  **settings):
        """Stack a fault on the handler or mix, for new and live connections: `handler`
        (a name, or a function) with `settings`, on the traffic of `direction`
        (to_backend, to_client or both; the handler's own by default), for a
        `toxicity` share of the connections.  It goes on top of the stack, or at
        `index`.  `name` defaults to the handler's (then NAME_2...).  Returns its
        description, as get_faults() gives it."""
        return self.apply_fault(handler, name, direction, toxicity, index, settings,
                                'a Python call')

    def apply_fault(self, handler, name, direction, toxicity, index, settings, origin):
        """add_fault(), saying where the change came from: `origin` is logged."""
        handler = self.handler(handler)
        fault = Fault(handler.name if name is None else name, handler, settings, direction,
                      toxicity)
        return self.lay_fault(fault, index, origin, named=name is not None)

    def lay_fault(self, fault, index, origin, named=True):
        """Put `fault` on the stack (on top, or at `index`), for new and live connections;
        unless `named`, under the first free name of NAME, NAME_2..."""
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ConfigError('a fault index is an integer, not %s' % shown(index))
        self.pump.call(self._lay, fault, index, named)
        self._changed('fault %s added' % fault.name, fault.describe(), origin)
        return fault.describe()

    def _lay(self, fault, index, named):
        taken = {other.name for other in self.fault_stack}
        if not named:
            base = fault.name
            fault.name = next(candidate for candidate in itertools.chain(
                [base], ('%s_%d' % (base, number) for number in itertools.count(2)))
                if candidate not in taken)
        elif fault.name in taken:
            raise FaultExists('a fault named %r exists already' % fault.name)
        if index is not None and not 0 <= index <= len(self.fault_stack):
            raise ConfigError('fault index %d: the stack holds %d, so 0 to %d' % (
                index, len(self.fault_stack), len(self.fault_stack)))
        fault.epoch = (self._accepted, time.monotonic())
        self.fault_stack.insert(len(self.fault_stack) if index is None else index, fault)
        for conn in self._live():
            conn.add_fault(fault)
            conn.met_live(fault)

    def update_fault(self, name, /, toxicity=None, **settings):
        """Change fault `name`'s settings (merged with its own) or toxicity, for new and
        live connections; its description."""
        return self.apply_fault_update(name, settings, toxicity, 'a Python call')

    def apply_fault_update(self, name, settings, toxicity, origin):
        fault = self.pump.call(self._reconfigure, name, dict(settings), toxicity)
        self._changed('fault %s updated' % name, fault.describe(), origin)
        return fault.describe()

    def _reconfigure(self, name, settings, toxicity):
        """Looked up and changed in the pump: a fault removed meanwhile is not found."""
        fault = self.find_fault(name)
        direction = settings.pop('direction', fault.direction)
        if not isinstance(direction, str) or STREAMS.get(direction, direction) != \
                fault.direction:
            raise ConfigError('fault %s: its direction is %s; to change it, remove the '
                              'fault and add it again' % (name, fault.direction))
        draws = fault.draws
        fault.configure(settings, toxicity=toxicity)
        fault.epoch = (self._accepted, time.monotonic())   # set again: counted anew
        for conn in self._live():
            conn.updated(fault, redraw=fault.draws != draws)
        return fault

    def remove_fault(self, name):
        """Take fault `name` off, for new and live connections: what its layers hold
        goes on at once, in order.  Its last description."""
        return self.apply_fault_removal(name, 'a Python call')

    def apply_fault_removal(self, name, origin):
        fault = self.pump.call(self._unlay, name)
        self._changed('fault %s removed' % name, fault.describe(), origin)
        return fault.describe()

    def _unlay(self, name):
        fault = self.find_fault(name)
        self.fault_stack.remove(fault)
        fault.active = False
        for conn in self._live():
            conn.remove_fault(fault)
        return fault

    def clear_faults(self, origin='a Python call'):
        """Remove every fault; their last descriptions."""
        removed = []
        for fault in list(self.fault_stack):
            with contextlib.suppress(FaultNotFound):     # removed meanwhile
                removed.append(self.apply_fault_removal(fault.name, origin))
        return removed

    def get_faults(self):
        """The stack, bottom first: each fault's description (name, handler, settings,
        direction, toxicity, and the connections it applied to and how they ended)."""
        return [fault.describe() for fault in list(self.fault_stack)]

    def find_fault(self, name):
        for fault in list(self.fault_stack):
            if fault.name == name:
                return fault
        raise FaultNotFound('no fault named %s (faults: %s)' % (shown(name), ', '.join(
            fault.name for fault in self.fault_stack) or 'none'))

    def _changed(self, what, description, origin):
        EVENTS.record('changed', self.name, {'fault': description, 'by': origin})
        if log.isEnabledFor(logging.INFO):
            log.info('%s, by %s (%s, %s, toxicity %g)', what, origin, description['handler'],
                     _settings_text(description['settings']), description['toxicity'])

    def status(self):
        return {'name': self.name, 'local': format_address(self.address),
                'distant': format_address(self.distant), 'enabled': self.enabled,
                'connections': self.connection_count, 'accepted': self._accepted}

    def update(self, local=None, distant=None):
        """Listen on `local` and connect new connections to `distant`, from now on;
        live connections go on.  Returns the status; nothing changes on an error."""
        distant = self.distant if distant is None else _distant_option(distant)
        local = None if local is None else _address_option(local, 'local')
        if local is not None and local[1] and local == self.address:
            local = None                      # where it listens already
        self._check_not_itself(local, distant)
        self.pump.call(self._update, local, distant)
        return self.status()

    def _update(self, local, distant):
        if local is not None:
            self._move(local)
        if distant != self.distant:
            self.distant, self._addresses = distant, None   # a lookup under way is stale

    def _move(self, local):
        """Listen on `local` instead: bound first, so the old address stays on a failure;
        a proxy disabled or refusing binds it when it listens again."""
        sock = socket.socket(_family(local), self.socket_type)
        try:
            if self.allow_reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(local)
        except OSError as exc:
            sock.close()
            raise listen_error(exc, local, "local='HOST:0'") from None
        listening = self.enabled and self._refusal is None
        self._close_listener()
        self.socket, self.server_address = sock, sock.getsockname()
        self.address_family = sock.family
        if not listening:
            return sock.close()      # bound again, on this address, by _listen()
        self.server_activate()
        self.enabled = True
        self._listen()

    def _new_epoch(self):
        if self.pump.forked:     # a change here would change nothing there
            self.pump.refuse_forked()
        self.epoch = (self._accepted, time.monotonic())
        self.handling = object()


# ---------------------------------------------------------------------------
# Control API
# ---------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status, message, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


_BROWSER_AGENT = re.compile(r'^Mozilla/|Chrome/|Safari/|Firefox/')


class ControlServer(http.server.ThreadingHTTPServer):
    """The JSON control API, in threads of the proxy's process."""

    request_queue_size = 128

    def __init__(self, proxy, host='localhost', port=8080, token=None):
        self.proxy, self.token = proxy, token     # the default proxy, whose API this is
        self.proxies = {proxy.name: proxy}        # every proxy it drives, by name
        self.lock = threading.Lock()              # of `proxies`, and of `stopped` for them
        self.stopped = False
        self.tokens = {token.encode('utf-8')} if token else set()   # what a client sends:
        with contextlib.suppress(UnicodeEncodeError, AttributeError):   # UTF-8, or Latin-1
            self.tokens.add(token.encode('latin-1'))
        self.address_family = _family((host, port))
        super().__init__((host, port), ControlHandler)
        _SERVERS.add(self)
        if not self.socket.getsockname()[0].startswith(('127.', '::1')):
            log.warning('the control API listens on %s, beyond loopback: anyone who reaches '
                        'it can drive this proxy%s', format_address(self.server_address),
                        '' if token else ' (set --http-token)')

    def server_bind(self):
        try:
            super().server_bind()
        except OSError as exc:
            raise listen_error(exc, self.server_address, 'http_port=0 or --http-port 0') from None

    def authorized(self, header):
        """Whether an Authorization header carries the token: ``Bearer TOKEN``, the
        scheme in any case, the token in UTF-8 or Latin-1, compared in constant time."""
        scheme, _, credentials = (header or '').strip().partition(' ')
        given = credentials.strip().encode('latin-1', 'replace')   # the header's own bytes
        return scheme.lower() == 'bearer' and any(
            hmac.compare_digest(given, expected) for expected in self.tokens)

    def get_request(self):
        """Accept; out of descriptors, wait a moment (the listener stays readable: no spin)."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self.proxy.pump.call_soon(self.proxy.pump.starved, exc,
                                          'control API calls wait')
                time.sleep(0.1)
            raise

    def handle_error(self, request, client_address):
        """A caller that went away is no error of ours; anything else is logged."""
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            log.debug('API caller %s went away', format_address(client_address))
        else:
            log.exception('API request from %s failed', format_address(client_address))


class _Deadline:
    """A BaseHTTPRequestHandler mixin: each request, head and body, must arrive within
    `timeout` seconds in all (the socket's timeout is per read: a caller trickling
    bytes would hold a thread).  Set `reading` to None once the body is read."""

    reading = None   # since when the request being read has been read
    done = False     # the connection ended: its watch ends too

    def handle_one_request(self):
        """One request; one pump timer per connection watches it (`expire`): a request
        only notes when its reading started, and never wakes the pump up."""
        self.reading = time.monotonic()
        if not self.done and not getattr(self, 'watched', False):
            self.watched = True
            pump = shared_pump()
            pump.call_soon(pump.call_later, self.timeout, self.expire)
        super().handle_one_request()

    def expire(self):
        """The pump's call: a request read for `timeout` seconds is cut off; else look
        again when the one being read would be late (or in `timeout`, between two)."""
        if self.done:
            return
        now, since = time.monotonic(), self.reading
        if since is not None and now >= since + self.timeout:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        shared_pump().call_at((now if since is None else since) + self.timeout, self.expire)

    def finish(self):
        self.done = True
        super().finish()


class _OneSend:
    """A BaseHTTPRequestHandler mixin: an answer's head and body leave in one send (the
    output is buffered, and http.server flushes it after each request); an interim
    "100 Continue" leaves at once, for the client that waits for it to send its body.
    http.server's own refusals have a status line, in the subclass's form (`refuse`)."""

    wbufsize = -1
    VERSIONLESS = 505    # the status of a request line without an HTTP version

    def parse_request(self):
        """Refuse a request line without an HTTP version ("GET /path", HTTP/0.9) at once:
        http.server would wait for headers an HTTP/0.9 client never sends."""
        self.requestline = str(self.raw_requestline, 'iso-8859-1').rstrip('\r\n')
        if len(self.requestline.split()) != 2:
            return super().parse_request()
        self.command = None
        self.send_error(self.VERSIONLESS, 'a request line needs an HTTP version (HTTP/1.1)')
        return False

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, 414, 431, 501, 505), in the
        API's own form (`refuse`), and always with a status line: http.server leaves
        none for a request line it could not read (its version is still HTTP/0.9)."""
        self.request_version, self.close_connection = 'HTTP/1.1', True
        self.refuse(code, message or http.client.responses.get(code, 'error'))

    def handle_expect_100(self):
        answered = super().handle_expect_100()
        self.wfile.flush()
        return answered


class ControlHandler(_OneSend, _Deadline, http.server.BaseHTTPRequestHandler):
    """Routes: /handler, /handlers, /behavior, /proxy (the default proxy's), /proxies
    and /proxies/NAME[/handler|/handlers|/behavior]; JSON in and out."""

    protocol_version = 'HTTP/1.1'
    server_version = 'Vaurien/' + __version__
    timeout = 10   # seconds: a half-sent request does not hold a thread forever
    disable_nagle_algorithm = True   # a long answer's last piece must not wait

    #: path: {method: the name of the method answering it, given the request body}
    ROUTES = {
        '/handler': {'GET': 'get_handler', 'PUT': 'put_handler'},
        '/handlers': {'GET': 'get_handlers'},
        '/behavior': {'GET': 'get_behavior', 'PUT': 'put_behavior'},
        '/proxy': {'GET': 'get_proxy', 'PUT': 'update_proxy', 'DELETE': 'delete_proxy'},
        '/stats': {'GET': 'get_stats'},
        '/events': {'GET': 'get_events'},
        '/connections': {'GET': 'get_connections'},
        '/metrics': {'GET': 'get_metrics'},
        '/faults': {'GET': 'get_faults', 'PUT': 'add_fault', 'DELETE': 'clear_faults'},
    }
    PER_PROXY = ('/handler', '/handlers', '/behavior', '/stats', '/faults')   # /proxies/NAME
    FAULT = {'GET': 'get_fault', 'PUT': 'update_fault', 'DELETE': 'remove_fault'}  # /faults/F
    PROXIES = {'GET': 'get_proxies', 'PUT': 'create_proxy'}                 # /proxies
    NAMED = {'GET': 'get_proxy', 'PUT': 'update_proxy', 'DELETE': 'delete_proxy'}   # /NAME

    def do_GET(self):
        self.serve('GET')

    def do_PUT(self):
        self.serve('PUT')

    do_POST = do_PUT
    do_HEAD = do_GET

    def do_DELETE(self):
        self.serve('DELETE')

    do_PATCH = do_PUT     # an update, as PUT

    def do_OPTIONS(self):
        self.serve('OPTIONS')

    def refuse(self, code, message):
        """http.server's own refusals, in JSON."""
        self.reply(code, {'error': message, 'status': code})

    def serve(self, method):
        try:
            if self.server.stopped:
                raise ApiError(503, 'this proxy is stopped')
            self.check_caller()
            methods = self.route()
            if methods is None:
                raise ApiError(404, 'no such resource %r (try %s, /proxies)' % (
                    self.path, ', '.join(self.ROUTES)))
            if method not in methods:
                raise ApiError(405, '%s does not take %s' % (self.path, self.command),
                               allowed=sorted(set(methods) | ({'POST', 'PATCH'}
                                                              if 'PUT' in methods else set())))
            body = self.read_body() if method == 'PUT' else self.no_body()
            self.reading = None
            try:
                answer = getattr(self, methods[method])(body)
            except _Text as text:
                return self.reply_text(str(text))
            self.reply(201 if methods[method] in ('create_proxy', 'add_fault') else 200,
                       answer)
        except ApiError as exc:
            self.reply(exc.status, dict(error=str(exc), status=exc.status, **exc.extra))
        except ConfigError as exc:
            self.reply(exc.status, {'error': str(exc), 'status': exc.status})
        except OSError:
            raise                     # the caller went away: handle_error's
        except Exception as exc:      # a bug of ours: logged, answered, and serving goes on
            log.exception('control API %s %s failed', self.command, self.path)
            self.reply(500, {'error': 'internal error: %s' % exc, 'status': 500})

    def route(self):
        """The methods of the resource the path names, or None; sets `self.target`, the
        proxy it acts on (the default one, or /proxies/NAME's), and `self.fault`, the
        name in /faults/NAME."""
        path = self.path.split('?')[0].rstrip('/') or '/'
        self.target = self.server.proxy
        parts = path.split('/', 3)            # '', 'proxies', NAME, the rest
        if len(parts) < 2 or parts[0]:
            return None                       # not a path: "*", "handler"
        if parts[1] != 'proxies':
            return self.resource(path, self.ROUTES)
        if len(parts) == 2:
            return self.PROXIES
        name = urllib.parse.unquote(parts[2])
        self.target = self.server.proxies.get(name)
        if self.target is None:
            raise ApiError(404, 'no proxy named %r' % name, known=sorted(self.server.proxies))
        if len(parts) == 3:
            return self.NAMED
        return self.resource('/' + parts[3], self.PER_PROXY)

    def resource(self, path, known):
        """The methods of `path` (one of `known`), or of a fault: /faults/NAME."""
        head, _, name = path[1:].partition('/')
        if head == 'faults' and name and '/' not in name and '/faults' in known:
            self.fault = urllib.parse.unquote(name)
            return self.FAULT
        return self.ROUTES.get(path) if path in known else None

    def check_caller(self):
        """Refuse browsers (a web page must not drive a developer's proxy) and bad tokens."""
        if self.headers.get('Origin') or _BROWSER_AGENT.search(self.headers.get('User-Agent', '')):
            raise ApiError(403, 'browser requests are refused')
        if self.server.token and not self.server.authorized(self.headers.get('Authorization')):
            raise ApiError(401, 'missing or wrong bearer token')

    def no_body(self):
        """A GET with a body is refused: read as the next request, it would smuggle one."""
        if self.headers.get('Transfer-Encoding') or \
                self.headers.get('Content-Length', '0').strip() not in ('', '0'):
            raise ApiError(400, '%s takes no request body' % self.command)
        return b''

    def read_body(self):
        if self.headers.get('Transfer-Encoding'):
            raise ApiError(411, 'send a Content-Length, not a chunked body')
        text = self.headers.get('Content-Length') or '0'
        if not (text.isascii() and text.isdigit()):
            raise ApiError(400, 'bad Content-Length %r: expected a number of bytes' % text)
        length = int(text)
        if length > MAX_BODY:
            raise ApiError(413, 'request body over %d bytes' % MAX_BODY)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ApiError(400, 'request body shorter than its Content-Length')
        return body

    def parse(self, body, text_key):
        """A JSON object, or a plain text body taken as {text_key: text}."""
        try:
            text = body.decode('utf-8').strip()
        except UnicodeDecodeError:
            raise ApiError(400, 'request body is not UTF-8') from None
        if not text.startswith(('{', '[', '"')):
            return {text_key: text}
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ApiError(400, 'malformed JSON: %s' % exc) from None
        except RecursionError:
            raise ApiError(400, 'malformed JSON: nested too deeply') from None
        if not isinstance(value, dict):
            raise ApiError(400, 'expected a JSON object')
        return value

    def get_handler(self, body):
        return self.target.get_handler()

    def put_handler(self, body):
        """{"name", "settings"}; or what GET /handler returns, to restore it."""
        request = self.parse(body, 'name')
        self.check_keys(request, ('name', 'handler', 'settings', 'behavior', 'fixed'),
                        'settings go in "settings": {"name": "delay", "settings": {...}}')
        state = {key: value for key, value in request.items() if key != 'name'}
        if 'name' in request:
            state.setdefault('handler', request['name'])
        if not isinstance(state.get('settings', {}), dict):
            raise ApiError(400, '"settings" must be a JSON object')
        if not isinstance(state.get('behavior', ''), str) or \
                not isinstance(state.get('fixed', True), bool):
            raise ApiError(400, '"behavior" must be a string, "fixed" true or false')
        name, fixed = state.get('handler'), state.get('fixed', True)
        if fixed and (not isinstance(name, str) or not name or
                      request.get('name', name) != name):
            raise ApiError(400, 'give the handler as {"name": NAME, "settings": {...}}')
        proxy = self.target
        if fixed and name not in proxy.handlers:
            raise ApiError(400, unknown_handler(name, proxy.handlers),
                           known=proxy.list_handlers())
        if 'fixed' in state or 'behavior' in state:
            return proxy.restore(state, self.origin())
        return proxy.apply_handler(name, state.get('settings', {}), self.origin())

    def check_keys(self, request, known, hint=''):
        unknown = sorted(set(request) - set(known))
        if unknown:
            raise ApiError(400, 'unknown key%s %s in the request body (known: %s)%s' % (
                's' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)),
                ', '.join(known), '; ' + hint if hint else ''))

    def origin(self):
        """Who made a change, as the log tells it."""
        agent = self.headers.get('User-Agent', '')
        return 'the control API (%s%s)' % (
            self.client_address[0], ', vaurien Client' if agent.startswith('vaurien-client')
            else ', ' + shown(agent[:40]) if agent else '')

    def get_handlers(self, body):
        proxy = self.target
        return {'handlers': proxy.list_handlers(),
                'details': {name: proxy.handlers[name].describe() for name in proxy.handlers}}

    def put_behavior(self, body):
        request = self.parse(body, 'behavior')
        self.check_keys(request, ('behavior',))
        spec = request.get('behavior')
        if not isinstance(spec, str):
            raise ApiError(400, 'give the mix as {"behavior": "20:delay,10:errors"}')
        self.target.apply_behavior(spec, self.origin())
        return self.get_behavior(body)

    def get_behavior(self, body):
        return {'behavior': self.target.get_behavior()}

    def get_proxy(self, body):
        return self.target.status()

    ENABLED = Setting('enabled', 'bool', 'true', 'whether the proxy accepts connections.')

    def enabled(self, request):
        """The request's "enabled", as a bool (true, "yes", "off", 0...)."""
        try:
            return self.ENABLED.convert(request.get('enabled'))
        except ValueError:
            raise ApiError(400, 'give {"enabled": true} or {"enabled": false}') from None

    def switch(self, enabled):
        """Accept (listening again) or refuse connections; the proxy's status."""
        try:
            return self.target.enable() if enabled else self.target.disable()
        except OSError as exc:
            raise ApiError(409, exc.strerror or str(exc)) from None

    def get_stats(self, body):
        return self.target.metrics()

    def query(self, key, kind=str, default=None):
        """A parameter of the query string, typed."""
        values = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get(key)
        if not values:
            return default
        try:
            return kind(values[-1])
        except ValueError:
            raise ApiError(400, 'bad %s=%s in the query string' % (key, shown(values[-1])))

    def get_events(self, body):
        """?since=ID (the last id seen) and ?proxy=NAME: what happened since."""
        events = EVENTS.since(self.query('since', int, 0), self.query('proxy'))
        return {'events': events, 'oldest': EVENTS.oldest(),
                'last': events[-1]['id'] if events else self.query('since', int, 0)}

    def get_connections(self, body):
        name = self.query('proxy')
        return {'connections': [conn.summary() for proxy in list(self.server.proxies.values())
                                if name in (None, proxy.name) for conn in proxy._live()]}

    def get_metrics(self, body):
        """Prometheus text: every proxy's counts."""
        raise _Text(prometheus_text(list(self.server.proxies.values())))

    def get_proxies(self, body):
        return {name: proxy.status() for name, proxy in sorted(list(
            self.server.proxies.items()))}

    def create_proxy(self, body):
        """A new proxy: {"name", "distant", "local" (default 127.0.0.1:0), "behavior",
        "seed"}; it has the default proxy's handlers and options.  201, its status."""
        request = self.parse(body, 'name')
        self.check_keys(request, ('name', 'local', 'distant', 'behavior', 'seed'))
        name = request.get('name')
        if not isinstance(name, str) or 'distant' not in request:
            raise ApiError(400, 'give a name and the backend: {"name": NAME, "distant": '
                                '"HOST:PORT"}')
        owner = self.server.proxy
        with self.server.lock:       # one name, one proxy, however many callers at once
            if self.server.stopped:
                raise ApiError(503, 'this proxy is stopped')
            if name in self.server.proxies:
                raise ApiError(409, 'a proxy named %r exists already' % name)
            try:
                proxy = Proxy(request.get('local', '127.0.0.1:0'), request['distant'],
                              behavior=request.get('behavior', '100:normal'),
                              seed=request.get('seed'), handlers=owner.handlers,
                              connect_timeout=owner.connect_timeout,
                              max_connections=owner.max_connections, name=name)
            except OSError as exc:
                raise ApiError(409, exc.strerror or str(exc)) from None
            self.server.proxies[proxy.name] = proxy
        log.info('proxy %s created (%s -> %s), by %s', proxy.name,
                 format_address(proxy.address), format_address(proxy.distant), self.origin())
        return proxy.status()

    def update_proxy(self, body):
        """{"local", "distant", "enabled"}, any of them: listen, connect, accept."""
        request = self.parse(body, 'enabled')
        self.check_keys(request, ('local', 'distant', 'enabled'), 'the others are read-only')
        enabled = self.enabled(request) if 'enabled' in request else None
        try:
            status = self.target.update(request.get('local'), request.get('distant'))
        except OSError as exc:
            raise ApiError(409, exc.strerror or str(exc)) from None
        return status if enabled is None else self.switch(enabled)

    def delete_proxy(self, body):
        proxy = self.target
        if proxy is self.server.proxy:
            raise ApiError(409, 'the default proxy %r goes with its control API: stop the '
                                'process instead' % proxy.name)
        with self.server.lock:
            if self.server.proxies.pop(proxy.name, None) is None:
                raise ApiError(404, 'no proxy named %r' % proxy.name)
        proxy.stop()
        log.info('proxy %s deleted, by %s', proxy.name, self.origin())
        return dict(proxy.status(), deleted=True)

    # -- faults ----------------------------------------------------------------------

    FAULT_OPTIONS = ('name', 'direction', 'toxicity', 'index')

    def get_faults(self, body):
        return {'faults': self.target.get_faults()}

    def add_fault(self, body):
        """{"handler", "settings", "name", "direction", "toxicity", "index"}; 201, the
        fault."""
        request = self.parse(body, 'handler')
        self.check_keys(request, ('handler', 'settings') + self.FAULT_OPTIONS,
                        'settings go in "settings": {"handler": "delay", "settings": {...}}')
        handler, settings = request.get('handler'), self.settings_of(request)
        if not isinstance(handler, str) or handler not in self.target.handlers:
            raise ApiError(400, unknown_handler(handler, self.target.handlers)
                           if isinstance(handler, str) else
                           'give the fault as {"handler": NAME, "settings": {...}}',
                           known=self.target.list_handlers())
        return self.target.apply_fault(
            handler, request.get('name'), request.get('direction'),
            request.get('toxicity', 1.0), request.get('index'), settings, self.origin())

    @staticmethod
    def settings_of(request):
        settings = request.get('settings', {})
        if not isinstance(settings, dict):
            raise ApiError(400, '"settings" must be a JSON object')
        return settings

    def get_fault(self, body):
        return self.target.find_fault(self.fault).describe()

    def update_fault(self, body):
        """{"settings", "toxicity"}, either: merged into the fault's."""
        request = self.parse(body, 'toxicity')
        self.check_keys(request, ('settings', 'toxicity'), 'to change anything else, remove '
                                                           'the fault and add it again')
        return self.target.apply_fault_update(self.fault, self.settings_of(request),
                                              request.get('toxicity'), self.origin())

    def remove_fault(self, body):
        return dict(self.target.apply_fault_removal(self.fault, self.origin()), removed=True)

    def clear_faults(self, body):
        return {'removed': self.target.clear_faults(self.origin())}

    def reply_text(self, text):
        body = text.encode()
        self.send_response(200)
        self.send_header('Content-Type', PROMETHEUS_TYPE)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def reply(self, status, payload):
        body = (json.dumps(payload) + '\n').encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        if 'allowed' in payload:
            self.send_header('Allow', ', '.join(payload['allowed']))
        if status >= 400:
            self.send_header('Connection', 'close')
            self.close_connection = True
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)
        if status >= 400:
            self.wfile.flush()
            _drain_and_close(self.connection)

    def log_message(self, format, *args):
        log.debug('control API %s: ' + format, self.client_address[0], *args)


class _Text(Exception):
    """A route's answer that is text, not JSON (Prometheus' /metrics)."""


def _label(value):
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


PROMETHEUS_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


def prometheus_text(proxies):
    """The Prometheus text of /metrics: every proxy's counts."""
    lines = []
    for metric, kind, help, samples in _metric_samples(proxies):
        lines += ['# HELP %s %s' % (metric, help), '# TYPE %s %s' % (metric, kind)]
        lines += ['%s{%s} %s' % (metric, ','.join('%s="%s"' % (key, _label(value))
                                                   for key, value in labels), value)
                  for labels, value in samples]
    return '\n'.join(lines) + '\n'


def _metric_samples(proxies):
    """(metric, type, help, [(labels, value)]) of Prometheus' /metrics."""
    stats = [proxy.metrics() for proxy in proxies]
    return [
        ('vaurien_connections_total', 'counter', 'Connections accepted.',
         [((('proxy', s['proxy']),), s['accepted']) for s in stats]),
        ('vaurien_connections_open', 'gauge', 'Connections open now.',
         [((('proxy', s['proxy']),), s['open']) for s in stats]),
        ('vaurien_bytes_total', 'counter', 'Bytes relayed by connections that ended.',
         [((('proxy', s['proxy']), ('direction', way)), s[way]) for s in stats
          for way in ('to_backend', 'to_client')]),
        ('vaurien_connections_ended_total', 'counter', 'Connections ended, by how.',
         [((('proxy', s['proxy']), ('how', how)), count) for s in stats
          for how, count in s['ended'].items()]),
        ('vaurien_handler_connections_total', 'counter',
         'Connections ended, by the handler in force at their end.',
         [((('proxy', s['proxy']), ('handler', name)), count) for s in stats
          for name, count in sorted(s['handlers'].items())]),
        ('vaurien_fault_connections_total', 'counter',
         'Connections a fault on the stack applied to.',
         [((('proxy', s['proxy']), ('fault', name)), fault['connections']) for s in stats
          for name, fault in s['faults'].items()]),
    ]


def _drain_and_close(sock, linger=LINGER, limit=4 * MAX_BODY):
    """Half-close, then read what the peer still sends, so no RST hides our answer."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger
        while limit > 0 and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            limit -= len(data)


# ---------------------------------------------------------------------------
# Toxiproxy's API: the clients of Toxiproxy drive Vaurien unchanged
# ---------------------------------------------------------------------------

TOXIPROXY_VERSION = '2.12.0'   # the Toxiproxy whose API this one answers as
UNLIMITED = 10 ** 15           # bytes per second: Toxiproxy's bandwidth rate 0 (no limit)

#: Toxiproxy's toxic types: (the Vaurien handler, the Go struct (for error messages),
#: the attributes with their defaults and Go types, the handler's settings from them).
#: Toxiproxy's units: ms, KB/s (1000 bytes), µs for slicer's delay.
TOXICS = {
    'latency': ('delay', 'LatencyToxic', {'latency': 0, 'jitter': 0}, 'int64', lambda a: {
        'sleep': max(0, a['latency']) / 1000, 'jitter': max(0, a['jitter']) / 1000}),
    'bandwidth': ('bandwidth', 'BandwidthToxic', {'rate': 0}, 'int64', lambda a: {
        'rate': a['rate'] * 1000 if a['rate'] > 0 else UNLIMITED}),
    'slow_close': ('slow_close', 'SlowCloseToxic', {'delay': 0}, 'int64', lambda a: {
        'delay': max(0, a['delay']) / 1000}),
    'timeout': ('timeout', 'TimeoutToxic', {'timeout': 0}, 'int64', lambda a: {
        'timeout': max(0, a['timeout']) / 1000, 'client_eof': 'close',
        'backend_eof': 'close'}),
    'reset_peer': ('reset_peer', 'ResetToxic', {'timeout': 0}, 'int64', lambda a: {
        'timeout': max(0, a['timeout']) / 1000}),
    'slicer': ('slicer', 'SlicerToxic', {'average_size': 0, 'size_variation': 0, 'delay': 0},
               'int', lambda a: {'size': max(1, a['average_size']),
                                 'variation': max(0, a['size_variation']),
                                 'delay': max(0, a['delay']) / 1e6}),
    'limit_data': ('limit_data', 'LimitDataToxic', {'bytes': 0}, 'int64', lambda a: {
        'bytes': max(0, a['bytes'])}),
    'noop': ('normal', 'NoopToxic', {}, 'int64', lambda a: {}),
}


class ToxiproxyError(Exception):
    """An answer of Toxiproxy's API that is an error: {"error": message, "status": status}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _go_json(value):
    """JSON as Go's encoding/json writes it: compact, <, > and & escaped."""
    text = json.dumps(value, separators=(',', ':'), ensure_ascii=False)
    for char, escaped in (('<', '\\u003c'), ('>', '\\u003e'), ('&', '\\u0026'),
                          ('\u2028', '\\u2028'), ('\u2029', '\\u2029')):
        text = text.replace(char, escaped)
    return text


def _go_kind(value):
    """How Go's encoding/json names a JSON value in its errors."""
    if isinstance(value, bool):
        return 'bool'
    if isinstance(value, (int, float)):
        return 'number'
    return {str: 'string', list: 'array', dict: 'object'}.get(type(value), 'null')


def _go_decode(body, what, expected=dict):
    """The first JSON value of `body` (an `expected` or null), or a ToxiproxyError 400
    that words it as Go does (`what`: the Go type it is decoded into)."""
    text = body.decode('utf-8', 'replace').lstrip(' \t\r\n')
    if not text:
        raise ToxiproxyError(400, 'bad request body: EOF')
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError as exc:
        at = getattr(exc, 'pos', 0)
        raise ToxiproxyError(400, 'bad request body: ' + (
            'unexpected EOF' if at >= len(text.rstrip()) else
            'invalid character %r looking for beginning of value' % text[at])) from None
    except RecursionError:    # Go's limit is deeper (10,000), its words the same
        raise ToxiproxyError(400, 'bad request body: invalid character %r exceeded max '
                                  'depth' % text[0]) from None
    if not isinstance(value, expected) and value is not None:
        raise ToxiproxyError(400, 'bad request body: json: cannot unmarshal %s into Go value '
                                  'of type %s' % (_go_kind(value), what))
    return value


def _go_fields(request, struct, fields, into):
    """Copy `request`'s keys that name `fields` ({name: Go type}) into `into`, as Go does:
    keys in any case, null ignored, a value of the wrong type refused."""
    for key, value in (request or {}).items():
        name = key.lower()
        if name not in fields or value is None:
            continue
        kind = fields[name]
        good = {'string': isinstance(value, str), 'bool': isinstance(value, bool),
                'float32': isinstance(value, (int, float)) and not isinstance(value, bool)
                and abs(value) <= 3.4e38}.get(kind, isinstance(value, int) and not isinstance(
                    value, bool) and -2 ** 63 <= value < 2 ** 63)
        if not good:
            shown_kind = _go_kind(value)
            if shown_kind == 'number' and kind.startswith('int'):   # Go shows the number
                shown_kind = 'number %s' % json.dumps(value)
            raise ToxiproxyError(400, 'bad request body: json: cannot unmarshal %s into Go '
                                      'struct field %s.%s of type %s' % (
                                          shown_kind, struct, name, kind))
        into[name] = value
    return into


PROXY_FIELDS = {'name': 'string', 'listen': 'string', 'upstream': 'string', 'enabled': 'bool'}
TOXIC_FIELDS = {'name': 'string', 'type': 'string', 'stream': 'string', 'toxicity': 'float32'}


class ToxiproxyServer(http.server.ThreadingHTTPServer):
    """Toxiproxy's HTTP API (2.x, as 2.12 answers it), in threads of this process.

    Toxiproxy's clients (Go, Ruby, Python, Node, toxiproxy-cli...) create,
    update and delete proxies here, and their toxics, which are stacked
    faults (`TOXICS` maps Toxiproxy's types; any registered handler is a type
    too, its settings as attributes).  The proxies are shared with the native
    control API when `proxies` and `lock` are its own.
    """

    daemon_threads = True
    request_queue_size = 128
    handle_error = ControlServer.handle_error

    def __init__(self, address=('localhost', 8474), proxies=None, lock=None, handlers=None,
                 **options):
        self.proxies = {} if proxies is None else proxies   # name: Proxy
        self.lock = lock or threading.Lock()
        self.handlers = handlers      # of the proxies made here (None: the built-in ones)
        self.options = options        # seed, connect_timeout, max_connections of those
        self.spelled = {}             # Proxy: its listen and upstream, as a client gave them
        self.serving = False
        self.address_family = _family(address)
        super().__init__(address, ToxiproxyHandler)
        _SERVERS.add(self)

    def server_bind(self):
        try:
            super().server_bind()
        except OSError as exc:
            raise listen_error(exc, self.server_address,
                               '-port 0 (vaurien toxiproxy) or --toxiproxy-api HOST:0') from None

    def start(self):
        """Serve in a thread; returns self."""
        self.serving = True
        threading.Thread(target=self.serve_forever, args=(0.05,), name='vaurien-toxiproxy',
                         daemon=True).start()
        return self

    def stop(self, proxies=False):
        """Stop serving (and, with `proxies`, stop every proxy it knows)."""
        if self.serving:
            self.shutdown()      # which waits for serve_forever(): only once started
        self.server_close()
        if proxies:
            with self.lock:
                known, self.proxies = list(self.proxies.values()), {}
            for proxy in known:
                proxy.stop()

    # -- proxies as Toxiproxy shows them ------------------------------------------------

    def describe(self, proxy):
        """A proxy as Toxiproxy's JSON: name, listen (the address bound, once it listened:
        Toxiproxy rewrites it), upstream, enabled, Logger, toxics."""
        listen, upstream = self.spelled.get(proxy, (None, None))
        if listen is None or proxy.enabled:
            listen = format_address(proxy.address)
            self.spelled[proxy] = (listen, upstream)
        if upstream is None or _go_address(upstream, 'upstream') != proxy.distant:
            upstream = format_address(proxy.distant)
        return {'name': proxy.name, 'listen': listen, 'upstream': upstream,
                'enabled': proxy.enabled, 'Logger': {}, 'toxics': self.toxics(proxy)}

    def toxics(self, proxy):
        """Its faults as toxics, upstream ones first."""
        toxics = [self.toxic(fault) for fault in list(proxy.fault_stack)]
        upstream = [STREAMS.get(toxic['stream'].lower()) == 'to_backend' for toxic in toxics]
        return [toxic for toxic, up in zip(toxics, upstream) if up] + \
            [toxic for toxic, up in zip(toxics, upstream) if not up]

    @staticmethod
    def toxic(fault):
        """A fault as Toxiproxy's JSON: a toxic of Toxiproxy's types shows its attributes;
        any other fault (made here, or by Vaurien's API) its handler and settings."""
        toxic = fault.toxic or {}
        attributes = toxic.get('attributes')
        toxicity = fault.toxicity
        return {'attributes': dict(fault.settings if attributes is None else attributes),
                'name': fault.name, 'type': toxic.get('type', fault.handler.name),
                'stream': toxic.get('stream') or (
                    'upstream' if fault.direction == 'to_backend' else 'downstream'),
                'toxicity': int(toxicity) if toxicity == int(toxicity) else toxicity}

    def create(self, name, listen, upstream, enabled, origin):
        """A new proxy (the caller holds the lock): ToxiproxyError 500 if it cannot listen."""
        try:
            local = _go_address(listen or '127.0.0.1:0', 'listen')
            proxy = Proxy(local, _go_address(upstream, 'upstream'), name=name,
                          handlers=self.handlers, **self.options)
        except ConfigError as exc:
            raise ToxiproxyError(400, str(exc)) from None
        except OSError as exc:
            raise ToxiproxyError(500, 'listen tcp %s: bind: %s' % (
                _resolved_listen(listen), _go_error_text(exc))) from None
        if not enabled:
            proxy.disable()
        self.proxies[name] = proxy
        self.spelled[proxy] = (listen, upstream)
        log.info('proxy %s created (%s -> %s), by %s', name, format_address(proxy.address),
                 upstream, origin)
        return proxy

    def populate(self, body, origin):
        """POST /populate: create or replace each proxy of a JSON list, in order; those
        unchanged (the same listen, resolved, and upstream) are kept, with their
        toxics.  (status, payload): on an error, its status and the proxies made so
        far."""
        try:
            entries = _go_decode(body, '[]struct { toxiproxy.Proxy; Enabled *bool '
                                       '"json:\\"enabled\\"" }', list) or []
            wanted = [self._populate_entry(entry, number)
                      for number, entry in enumerate(entries, 1)]
        except ToxiproxyError as exc:
            return exc.status, {'error': str(exc), 'status': exc.status, 'proxies': None}
        made = []
        with self.lock:
            for fields in wanted:
                try:
                    made.append(self._add_or_replace(fields, origin))
                except ToxiproxyError as exc:
                    return exc.status, {'error': str(exc), 'status': exc.status, 'proxies': [
                        self.describe(proxy) for proxy in made] or None}
        return 201, {'proxies': [self.describe(proxy) for proxy in made] or None}

    @staticmethod
    def _populate_entry(entry, number):
        if not isinstance(entry, dict):
            raise ToxiproxyError(400, 'bad request body: json: cannot unmarshal %s into Go '
                                      'value of type struct { toxiproxy.Proxy; Enabled *bool '
                                      '"json:\\"enabled\\"" }' % _go_kind(entry))
        fields = _go_fields(entry, 'Proxy', PROXY_FIELDS, {'name': '', 'listen': '',
                                                           'upstream': '', 'enabled': True})
        for required in ('name', 'upstream'):
            if not fields[required]:
                raise ToxiproxyError(400, 'missing required field: %s at proxy %d'
                                     % (required, number))
        return fields

    def _add_or_replace(self, fields, origin):
        existing = self.proxies.get(fields['name'])
        if existing is not None:
            current = self.describe(existing)
            if current['listen'] == _resolved_listen(fields['listen']) and \
                    current['upstream'] == fields['upstream']:
                return existing
            self.remove(existing)
        return self.create(fields['name'], fields['listen'], fields['upstream'],
                           fields['enabled'], origin)

    def remove(self, proxy):
        """Stop and forget `proxy` (the caller holds the lock)."""
        self.proxies.pop(proxy.name, None)
        self.spelled.pop(proxy, None)
        proxy.stop()


def _go_address(text, what):
    """HOST:PORT as Go reads it: an empty host (":8474") is every interface to listen
    on ("[::]", as Toxiproxy shows it), this machine to connect to."""
    if text.startswith(':') and ':' not in text[1:]:
        text = ('[::]' if what == 'listen' else 'localhost') + text
    return parse_address(text, what)


def _resolved_listen(listen):
    """A listen address as Go's net.ResolveTCPAddr writes it: localhost:0 is 127.0.0.1:0."""
    try:
        host, port = _go_address(listen, 'listen')
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ConfigError, OSError, UnicodeError):
        return listen
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return format_address(infos[0][4][:2]) if infos else listen


_XID = '0123456789abcdefghijklmnopqrstuv'
_MACHINE = random.getrandbits(40)           # xid's machine and process bytes
_request_counter = itertools.count(random.getrandbits(24))


def _request_id():
    """An id as Toxiproxy's X-Toxiproxy-Request-Id (an xid): 20 characters of 0-9a-v,
    from the time, this process and a counter."""
    number = (int(time.time()) & 0xFFFFFFFF) << 64 | _MACHINE << 24 | \
        next(_request_counter) & 0xFFFFFF
    return ''.join(_XID[(number << 4) >> shift & 31] for shift in range(95, -1, -5))


def _go_error_text(exc):
    """An OSError worded as Go's syscall errors are: "address already in use"."""
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]


class ToxiproxyHandler(_OneSend, _Deadline, http.server.BaseHTTPRequestHandler):
    """The routes of Toxiproxy's API, with its JSON, its errors and their words."""

    protocol_version = 'HTTP/1.1'
    server_version = 'Vaurien/' + __version__
    timeout = 25
    disable_nagle_algorithm = True
    VERSIONLESS = 400    # as Go's server

    ROUTES = [
        (re.compile(r'/reset'), {'POST': 'reset'}),
        (re.compile(r'/proxies'), {'GET': 'proxy_index', 'POST': 'proxy_create'}),
        (re.compile(r'/populate'), {'POST': 'populate'}),
        (re.compile(r'/proxies/([^/]+)'), {'GET': 'proxy_show', 'POST': 'proxy_update',
                                           'PATCH': 'proxy_update', 'DELETE': 'proxy_delete'}),
        (re.compile(r'/proxies/([^/]+)/toxics'), {'GET': 'toxic_index',
                                                  'POST': 'toxic_create'}),
        (re.compile(r'/proxies/([^/]+)/toxics/([^/]+)'), {
            'GET': 'toxic_show', 'POST': 'toxic_update', 'PATCH': 'toxic_update',
            'DELETE': 'toxic_delete'}),
        (re.compile(r'/version'), {'GET': 'version'}),
        (re.compile(r'/metrics'), {'GET': 'metrics'}),
    ]

    def do_GET(self):
        self.serve()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_OPTIONS = do_GET

    def serve(self):
        """Route the request, its body read first, whatever the answer: a body left
        unread would be taken for the next request of the connection."""
        try:
            body = self.read_body()
        except (ToxiproxyError, ValueError) as exc:
            self.close_connection = True
            return self.send_error_json(400, 'bad request body: %s' % exc)
        self.reading = None
        path = urllib.parse.urlsplit(self.path).path
        for pattern, methods in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                break
        else:
            return self.send(404, b'404 page not found\n', 'text/plain; charset=utf-8',
                             nosniff=True)
        if self.command not in methods:
            return self.send(405, b'', None)
        if self.headers.get('User-Agent', '').startswith('Mozilla/'):
            return self.send(403, b'User agent not allowed\n', 'text/plain; charset=utf-8',
                             nosniff=True)
        args = [urllib.parse.unquote(part) for part in match.groups()]
        try:
            status, answer, *content_type = getattr(self, methods[self.command])(body, *args)
        except ToxiproxyError as exc:
            return self.send_error_json(exc.status, str(exc))
        except Exception as exc:      # a bug of ours: logged, answered, and serving goes on
            log.exception('Toxiproxy API %s %s failed', self.command, self.path)
            return self.send_error_json(500, 'internal error: %s' % exc)
        if content_type:
            return self.send(status, answer, content_type[0])
        self.send(status, b'' if answer is None else _go_json(answer).encode(),
                  None if answer is None else 'application/json')

    def read_body(self):
        """The body (Content-Length or chunked, up to MAX_BODY); ValueError if it is
        malformed or too large."""
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks, size = [], None
            while size != 0:
                size = int(self.chunk_line().split(b';')[0].strip(), 16)
                if size < 0 or sum(map(len, chunks)) + size > MAX_BODY:
                    raise ValueError('a chunk of a bad size')
                chunks.append(self.rfile.read(size))
                if size:
                    self.chunk_line()
            while self.chunk_line().strip():     # the trailer, up to its blank line
                pass
            return b''.join(chunks)
        length = self.headers.get('Content-Length', '0').strip() or '0'
        if not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY:
            raise ValueError('a bad Content-Length (at most %d bytes)' % MAX_BODY)
        return self.rfile.read(int(length))

    def chunk_line(self):
        line = self.rfile.readline(MAX_FIRST_LINE + 1)
        if not line.endswith(b'\n'):
            raise ValueError('a chunked body cut short, or a line of it too long')
        return line

    def send_error_json(self, status, message):
        """An error as Toxiproxy's: its JSON, as text/plain, with a newline."""
        error = _go_json({'error': message, 'status': status}) + '\n'
        self.send(status, error.encode(), 'text/plain; charset=utf-8', nosniff=True)

    def refuse(self, code, message):
        """http.server's own refusals, in Go's words: "400 Bad Request", as text."""
        self.send(code, ('%d %s' % (code, http.client.responses.get(code, 'Error'))).encode(),
                  'text/plain; charset=utf-8')

    def send(self, status, body, content_type, nosniff=False):
        self.send_response(status)
        self.send_header('X-Toxiproxy-Request-Id', _request_id())
        if content_type:
            self.send_header('Content-Type', content_type)
        if nosniff:
            self.send_header('X-Content-Type-Options', 'nosniff')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug('Toxiproxy API %s: ' + format, self.client_address[0], *args)

    def origin(self):
        agent = self.headers.get('User-Agent', '')
        return 'the Toxiproxy API (%s%s)' % (self.client_address[0],
                                              ', ' + shown(agent[:40]) if agent else '')

    # -- proxies ------------------------------------------------------------------------

    def find(self, name):
        proxy = self.server.proxies.get(name)
        if proxy is None:
            raise ToxiproxyError(404, 'proxy not found')
        return proxy

    def proxy_index(self, body):
        server = self.server
        return 200, {name: server.describe(proxy) for name, proxy in list(
            server.proxies.items())}

    def proxy_create(self, body):
        fields = _go_fields(_go_decode(body, 'toxiproxy.Proxy'), 'Proxy', PROXY_FIELDS, {
            'name': '', 'listen': '', 'upstream': '', 'enabled': True})
        for required in ('name', 'upstream'):
            if not fields[required]:
                raise ToxiproxyError(400, 'missing required field: ' + required)
        with self.server.lock:
            if fields['name'] in self.server.proxies:
                raise ToxiproxyError(409, 'proxy already exists')
            proxy = self.server.create(fields['name'], fields['listen'], fields['upstream'],
                                       fields['enabled'], self.origin())
        return 201, self.server.describe(proxy)

    def populate(self, body):
        return self.server.populate(body, self.origin())

    def proxy_show(self, body, name):
        return 200, self.server.describe(self.find(name))

    def proxy_update(self, body, name):
        """Listen, upstream and enabled over the current ones: a new listen or upstream
        closes the connections first (as Toxiproxy restarts the proxy)."""
        proxy = self.find(name)
        current = self.server.describe(proxy)
        fields = _go_fields(_go_decode(body, 'toxiproxy.Proxy'), 'Proxy', PROXY_FIELDS, {
            key: current[key] for key in ('listen', 'upstream', 'enabled')})
        if (fields['listen'], fields['upstream']) != (current['listen'], current['upstream']):
            try:
                local = _go_address(fields['listen'] or '127.0.0.1:0', 'listen')
                distant = _go_address(fields['upstream'], 'upstream')
                proxy.disable()
                proxy.update(local, distant)
            except ConfigError as exc:
                raise ToxiproxyError(400, str(exc)) from None
            except OSError as exc:
                raise ToxiproxyError(500, 'listen tcp %s: bind: %s' % (
                    _resolved_listen(fields['listen']), _go_error_text(exc))) from None
            self.server.spelled[proxy] = (fields['listen'], fields['upstream'])
            if fields['enabled']:
                self.enable(proxy)
        elif fields['enabled'] != proxy.enabled:
            self.enable(proxy) if fields['enabled'] else proxy.disable()
        return 200, self.server.describe(proxy)

    @staticmethod
    def enable(proxy):
        try:
            proxy.enable()
        except OSError as exc:
            raise ToxiproxyError(500, 'listen tcp %s: bind: %s' % (
                format_address(proxy.address), _go_error_text(exc))) from None

    def proxy_delete(self, body, name):
        with self.server.lock:
            self.server.remove(self.find(name))
        return 204, None

    def reset(self, body):
        """Every proxy enabled, every toxic removed; open connections go on."""
        for proxy in list(self.server.proxies.values()):
            if not proxy.enabled:
                self.enable(proxy)
            proxy.clear_faults(self.origin())
        return 204, None

    def version(self, body):
        """As Toxiproxy 2.6 and later: JSON (2.1-era clients took the bare text)."""
        return 200, ('{"version": "%s"}\n' % TOXIPROXY_VERSION).encode(), \
            'application/json;charset=utf-8'

    def metrics(self, body):
        return 200, prometheus_text(list(self.server.proxies.values())).encode(), \
            PROMETHEUS_TYPE

    # -- toxics -------------------------------------------------------------------------

    def toxic_index(self, body, name):
        return 200, self.server.toxics(self.find(name))

    def toxic_create(self, body, name):
        """Checked in Toxiproxy's order: the proxy, the body, the stream, the type, the
        name, then the attributes."""
        proxy = self.find(name)
        request = _go_decode(body, 'toxics.ToxicWrapper') or {}
        fields = _go_fields(request, 'ToxicWrapper', TOXIC_FIELDS, {
            'name': '', 'type': '', 'stream': 'downstream', 'toxicity': 1.0})
        self.check_attributes(request, 'ToxicWrapper.attributes', 'toxics.NoopToxic')
        direction = STREAMS.get(fields['stream'].lower())
        if direction is None:
            raise ToxiproxyError(400, 'stream was invalid, can be either upstream or '
                                      'downstream')
        kind = fields['type']
        if kind not in TOXICS and kind not in proxy.handlers:
            raise ToxiproxyError(400, 'invalid toxic type')
        fault_name = fields['name'] or '%s_%s' % (kind, fields['stream'])
        if any(fault.name == fault_name for fault in list(proxy.fault_stack)):
            raise ToxiproxyError(409, 'toxic already exists')
        attributes = self.attributes(kind in TOXICS, kind, request, {})
        handler, settings = self.settings(kind, attributes)
        handler = proxy.handler(handler)
        if kind not in TOXICS and 'direction' not in (handler.schema or {}):
            direction = 'both'       # errors, hang...: the whole connection, as in force
        try:
            fault = Fault(fault_name, handler, settings, direction, fields['toxicity'])
            fault.toxic = {'type': kind, 'stream': fields['stream'],
                           'attributes': attributes if kind in TOXICS else None}
            fault.closes_when_removed = kind == 'timeout'    # Toxiproxy's Cleanup closes
            proxy.lay_fault(fault, None, self.origin())
        except FaultExists:
            raise ToxiproxyError(409, 'toxic already exists') from None
        except ConfigError as exc:
            raise ToxiproxyError(400, str(exc)) from None
        return 200, self.server.toxic(fault)

    @staticmethod
    def check_attributes(request, field, go_type):
        """The request's attributes: an object, or null."""
        attributes = next((value for key, value in request.items()
                           if key.lower() == 'attributes'), None)
        if attributes is not None and not isinstance(attributes, dict):
            raise ToxiproxyError(400, 'bad request body: json: cannot unmarshal %s into Go '
                                      'struct field %s of type %s' % (
                                          _go_kind(attributes), field, go_type))
        return attributes

    def attributes(self, toxiproxy, kind, request, current):
        """The toxic's attributes: `current` (or the defaults) with the request's; of
        Toxiproxy's `kind` if `toxiproxy`, else a Vaurien handler's settings."""
        struct = TOXICS[kind][1] if toxiproxy else 'Toxic'
        attributes = self.check_attributes(request, '.attributes', 'toxics.' + struct)
        if toxiproxy:
            _, struct, defaults, go_type, _ = TOXICS[kind]
            return _go_fields(attributes, struct + '.attributes', dict.fromkeys(
                defaults, go_type), dict(defaults, **current))
        return dict(current, **(attributes or {}))

    @staticmethod
    def settings(kind, attributes, toxiproxy=True):
        """The Vaurien handler and its settings for a toxic of type `kind`."""
        if kind in TOXICS and toxiproxy:
            handler, _, _, _, convert = TOXICS[kind]
            return handler, convert(attributes)
        return kind, dict(attributes)

    def find_toxic(self, proxy, toxic):
        try:
            return proxy.find_fault(toxic)
        except FaultNotFound:
            raise ToxiproxyError(404, 'toxic not found') from None

    def toxic_show(self, body, name, toxic):
        proxy = self.find(name)
        return 200, self.server.toxic(self.find_toxic(proxy, toxic))

    def toxic_update(self, body, name, toxic):
        """Attributes merged over the toxic's; the toxicity changed only when given."""
        proxy = self.find(name)
        fault = self.find_toxic(proxy, toxic)
        described = self.server.toxic(fault)
        toxiproxy = bool(fault.toxic and fault.toxic['attributes'] is not None)
        request = _go_decode(body, 'toxics.ToxicWrapper') or {}
        toxicity = _go_fields(request, 'ToxicWrapper', {'toxicity': 'float32'}, {}).get(
            'toxicity')
        attributes = self.attributes(toxiproxy, described['type'], request,
                                     described['attributes'])
        _, settings = self.settings(described['type'], attributes, toxiproxy)
        settings.pop('direction', None)
        try:
            proxy.apply_fault_update(fault.name, settings, toxicity, self.origin())
        except FaultNotFound:
            raise ToxiproxyError(404, 'toxic not found') from None
        except ConfigError as exc:
            raise ToxiproxyError(400, str(exc)) from None
        if toxiproxy:
            fault.toxic['attributes'] = attributes
        return 200, self.server.toxic(fault)

    def toxic_delete(self, body, name, toxic):
        proxy = self.find(name)
        try:
            proxy.apply_fault_removal(toxic, self.origin())
        except FaultNotFound:
            raise ToxiproxyError(404, 'toxic not found') from None
        return 204, None


# ---------------------------------------------------------------------------
# Python API: Client, start_proxy, stop_proxy
# ---------------------------------------------------------------------------

_children = {}   # pid: the ProxyProcess of each proxy start_proxy() started, not stopped
_last = []       # the last one it started, stopped or not, for Client()'s error


class Client(_Driving):
    """Drives a running proxy through its control API (stdlib only).

    With no host and port, it talks to the proxy that ``start_proxy()`` last
    started in this process and that still runs (and raises if none does: it
    never drives another run's proxy instead); in a process that started
    none, to localhost:8080.  ``handle.client()`` is bound to one proxy.  Not
    thread-safe: use one Client per thread.
    """

    def __init__(self, host=None, port=None, timeout=5.0, token=None):
        default = _default_control() if host is None and port is None else ('localhost', 8080)
        self.host, self.port = host or default[0], port or default[1]
        self.timeout, self.token = timeout, token
        self.name = None      # the named proxy it drives; None: the default one
        self._http = None
        self._http_pid = None   # the process that opened it

    # -- named proxies ---------------------------------------------------------

    def proxy(self, name):
        """A Client of the proxy named `name`, on the same control API."""
        named = Client(self.host, self.port, self.timeout, self.token)
        named.name = name
        return named

    def proxies(self):
        """{name: status} of every proxy this control API drives."""
        return self._call('GET', '/proxies')

    def create_proxy(self, name, distant, local='127.0.0.1:0', behavior=None, seed=None):
        """A new named proxy, with the default proxy's handlers; a Client of it."""
        request = {'name': name, 'distant': distant, 'local': local}
        request.update((key, value) for key, value in (('behavior', behavior),
                                                       ('seed', seed)) if value is not None)
        self._call('PUT', '/proxies', request)
        return self.proxy(name)

    def update(self, local=None, distant=None):
        """Listen on `local`, connect new connections to `distant`; the status."""
        return self._call('PUT', '/proxy', {key: value for key, value in (
            ('local', local), ('distant', distant)) if value is not None})

    def delete(self):
        """Stop this named proxy and forget it."""
        return self._call('DELETE', '/proxy')

    def get_handler(self):
        return self._call('GET', '/handler')

    def set_handler(self, name, /, **settings):
        self._check_named(name)
        return self._call('PUT', '/handler', {'name': name, 'settings': settings})

    def restore(self, state):
        """Put back what get_handler() returned (one PUT /handler of it)."""
        return self._call('PUT', '/handler', state)

    def list_handlers(self):
        return self._call('GET', '/handlers')['handlers']

    def get_behavior(self):
        return self._call('GET', '/behavior')['behavior']

    def set_behavior(self, spec):
        return self._call('PUT', '/behavior', {'behavior': spec})['behavior']

    def status(self):
        return self._call('GET', '/proxy')

    def add_fault(self, handler, /, name=None, direction=None, toxicity=1.0, index=None,
                  **settings):
        """Stack a fault (see Proxy.add_fault); its description."""
        self._check_named(handler)
        request = {'handler': handler, 'settings': settings, 'toxicity': toxicity}
        request.update((key, value) for key, value in (
            ('name', name), ('direction', direction), ('index', index)) if value is not None)
        return self._call('PUT', '/faults', request)

    def update_fault(self, name, /, toxicity=None, **settings):
        request = {'settings': settings}
        if toxicity is not None:
            request['toxicity'] = toxicity
        return self._call('PATCH', '/faults/' + urllib.parse.quote(name, safe=''), request)

    def remove_fault(self, name):
        return self._call('DELETE', '/faults/' + urllib.parse.quote(name, safe=''))

    def clear_faults(self):
        return self._call('DELETE', '/faults')['removed']

    def get_faults(self):
        return self._call('GET', '/faults')['faults']

    def disable(self):
        return self._call('PUT', '/proxy', {'enabled': False})

    def enable(self):
        return self._call('PUT', '/proxy', {'enabled': True})

    @staticmethod
    def _check_named(handler):
        if callable(handler):
            raise VaurienError('a Client drives a proxy in another process, which cannot be '
                               'sent a function: register it there by name ([handler:NAME] '
                               'callable = module.function in its config file), then give '
                               'the name')

    def close(self):
        if self._http is not None:
            self._http.close()
            self._http = None

    def _call(self, method, path, payload=None):
        if self.name is not None and path != '/proxies':   # /proxy: its /proxies/NAME
            named = '/proxies/' + urllib.parse.quote(self.name, safe='')
            path = named if path == '/proxy' else named + path
        where = 'the Vaurien control API at %s:%s' % (self.host, self.port)
        body = None if payload is None else json.dumps(payload).encode()
        headers = {'User-Agent': 'vaurien-client/' + __version__,
                   'Content-Type': 'application/json'}
        if self.token:   # bytes: http.client would encode a str in Latin-1 only
            headers['Authorization'] = b'Bearer ' + self.token.encode('utf-8')
        if self._http is not None and self._http_pid != os.getpid():
            self.close()     # a fork's parent may use it too: the answers would cross
        for attempt in (1, 2):
            reused = self._http is not None
            if not reused:
                self._http = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._http_pid = os.getpid()
            try:
                self._http.request(method, path, body, headers)
                response = self._http.getresponse()
                data = response.read()
                break
            except ConnectionRefusedError:
                self.close()
                raise VaurienError('cannot reach %s: connection refused (is the proxy '
                                   'running, with --http?)' % where) from None
            except (http.client.HTTPException, ConnectionError) as exc:
                self.close()   # an idle keep-alive connection the server closed: retry once
                if not reused or attempt == 2:
                    raise VaurienError('%s %s on %s failed: %s' % (method, path, where, exc)) \
                        from None
            except OSError as exc:
                self.close()
                raise VaurienError('%s %s on %s failed: %s' % (method, path, where, exc)) \
                    from None
        if response.getheader('Connection', '').lower() == 'close':
            self.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise VaurienError('%s %s: %d, not a JSON answer: %r' % (
                method, path, response.status, data[:200])) from None
        if response.status >= 400:
            error = FaultNotFound if response.status == 404 and '/faults/' in path \
                else VaurienError
            raise error('%s %s: %d %s' % (method, path, response.status,
                                         answer.get('error', answer)))
        return answer


_TOXIPROXY_LINE = 'Vaurien Toxiproxy API: '   # and its address, before the ready line
_READY = re.compile(r'Vaurien ready: proxy ([^\s,;]+) -> ([^\s,;]+)'
                    r'(?:, control http://([^\s,;]+))?')


#: How start_proxy's child runs this file: as ``python3 vaurien.py`` does, but from
#: its cached bytecode, where a script is compiled anew each time (half of a start).
_RUN_AS_SCRIPT = '''import importlib.util, os, sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
if not getattr(sys.flags, 'safe_path', False):   # else -P: the script's folder is not added
    sys.path[0] = os.path.dirname(os.path.realpath(path))
spec = importlib.util.spec_from_file_location('__main__', path)
sys.modules['__main__'] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
'''


def start_proxy(port=None, host=None, local=None, distant=None, behavior=None,
                config=None, seed=None, http=True, http_host=None, http_port=None,
                http_token=None, log_level=None, log_output=None, timeout=10.0, echo=True,
                **options):
    """Run a proxy in a subprocess (this very file); return it once it is ready.

    What is returned *is* the child's pid (an int: ``stop_proxy(pid)``), and
    a ProxyProcess: ``.local``, ``.control``, ``.client()``, ``.stop()``,
    ``.output``, and a context manager.  `host`/`port` name the backend (or
    give `distant='host:port'`); every other keyword is the command-line
    option of the same name (``max_connections=10`` is ``--max-connections
    10``); port 0, for `local` or `http_port`, picks a free one.  The control
    API is on unless http=False.  Ready means the proxy and the control API
    accept connections: no sleep, no probe.  The child's log lines go to this
    process's stderr as they come (unless echo=False).  The child exits when
    this process dies, however it dies.  A proxy that fails to start raises
    VaurienError with its error output.
    """
    known = set(vars(build_parser().parse_args([]))) - {'list_handlers', 'exit_on_eof'}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise TypeError('start_proxy() got an unknown option %r%s' % (
                key, ' (did you mean %s?)' % close[0] if close else ''))
    if host is not None or port is not None:
        distant = '%s:%s' % (host or 'localhost', port or 80)
    args = [sys.executable, '-c', _RUN_AS_SCRIPT, os.path.abspath(__file__), '--exit-on-eof']
    flags = dict(options, local=local, distant=distant, behavior=behavior, config=config,
                 seed=seed, http_host=http_host, http_port=http_port, http_token=http_token,
                 log_level=log_level, log_output=log_output)
    flags['http'] = http
    for key, value in flags.items():
        flag = '--' + key.replace('_', '-')
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):     # a flag given again: --proxy
            for each in value:
                args += [flag, str(each)]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, errors='replace')
    lines = collections.deque(maxlen=1000)
    ready = _wait_ready(child, lines, timeout, echo)
    handle = ProxyProcess(child, lines, ready, http_token)
    threading.Thread(target=_relay_output, args=(child.stderr, lines, echo), daemon=True,
                     name='vaurien-child-%d' % child.pid).start()
    _children[child.pid] = handle
    _last[:] = [handle]
    return handle


class ProxyProcess(int):
    """What start_proxy() returns: the child's pid, as an int, that also knows
    where its proxy listens, drives it and stops it."""

    def __new__(cls, child, lines, ready, token=None):
        self = super().__new__(cls, child.pid)
        self.child, self.lines, self.token = child, lines, token
        self.local = parse_address(ready.group(1))      #: (host, port) of the proxy
        self.distant = ready.group(2)                   #: its backend, as 'host:port'
        #: (host, port) of the control API, or None without one
        self.control = ready.group(3) and parse_address(ready.group(3))
        #: (host, port) of Toxiproxy's API (toxiproxy_api=...), or None without one
        self.toxiproxy = next((parse_address(line.split('http://', 1)[1].strip())
                               for line in lines if line.startswith(_TOXIPROXY_LINE)), None)
        return self

    __str__ = int.__repr__     # str(pid) stays the number

    def __repr__(self):
        return '<vaurien proxy pid %d: %s -> %s%s>' % (
            self, format_address(self.local), self.distant,
            ', control %s' % format_address(self.control) if self.control else '')

    @property
    def pid(self):
        return int(self)

    @property
    def running(self):
        return self.child.poll() is None

    @property
    def output(self):
        """What the child has written on stderr so far (its last 1,000 lines)."""
        return ''.join(list(self.lines))

    def client(self, timeout=5.0):
        """A Client of this proxy's control API."""
        if not self.control:
            raise VaurienError('the proxy pid %d runs without its control API (http=False)'
                               % self)
        if self not in _children:
            raise VaurienError('the proxy pid %d was stopped' % self)
        if not self.running:
            raise VaurienError('the proxy pid %d exited with status %s: %s' % (
                self, self.child.poll(), self.output.strip()[-500:] or 'no output'))
        return Client(*self.control, timeout=timeout, token=self.token)

    def stop(self):
        """stop_proxy() this proxy (again: nothing more); returns its exit status."""
        if self in _children:
            return stop_proxy(self)
        return self.child.poll()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def _default_control():
    """The control API of the last proxy start_proxy() started that still runs;
    raises if every one it started is gone (another run's could listen there)."""
    if not _last:
        return 'localhost', 8080
    live = [handle for handle in _children.values() if handle.running]
    if live and live[-1].control:
        return live[-1].control
    last = live[-1] if live else _last[0]
    why = 'runs without its control API' if not last.control else \
        'was stopped' if last not in _children else \
        'exited with status %s: %s' % (last.child.poll(), last.output.strip()[-500:] or
                                       'no output')
    raise VaurienError('the proxy start_proxy() started last (pid %d) %s; give Client(host, '
                       'port) to drive another one' % (last, why))


def _wait_ready(child, lines, timeout, echo):
    """Read the child's stderr until its ready line; raise if it dies or stalls."""
    expired = []
    timer = threading.Timer(timeout, lambda: (expired.append(True), child.kill()))
    timer.start()
    try:
        for line in child.stderr:
            _keep(line, lines, echo)
            ready = _READY.search(line)
            if ready:
                return ready
    finally:
        timer.cancel()
    status = child.wait()
    child.stdin.close()
    child.stderr.close()
    why = 'was not ready after %g s: killed' % timeout if expired \
        else 'exited with status %s' % status
    raise VaurienError('the proxy did not start (it %s): %s' % (
        why, ''.join(lines).strip() or 'no output'))


def _relay_output(stream, lines, echo):
    """The child's stderr, line by line, until it exits: kept, and echoed; then closed."""
    with contextlib.suppress(ValueError, OSError), stream:
        for line in stream:
            _keep(line, lines, echo)


def _keep(line, lines, echo):
    lines.append(line)
    if echo:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # a closed capture
            sys.stderr.write(line)
            sys.stderr.flush()


def stop_proxy(pid):
    """Stop a proxy started by start_proxy(): terminate, wait, kill if needed."""
    try:
        handle = _children.pop(pid)
    except (KeyError, TypeError):
        raise ValueError('no proxy started by start_proxy() has pid %s, or it was stopped '
                         'already' % (int(pid) if isinstance(pid, int) else repr(pid),)) from None
    child = handle.child
    child.terminate()
    try:
        child.wait(5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    child.stdin.close()
    return child.returncode


# ---------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------

#: The options of [vaurien] and of the command line: name -> Setting.
OPTIONS = {s.name: s for s in (
    Setting('local', 'address', 'localhost:8000',
            'HOST:PORT the proxy listens on; port 0 picks one.'),
    Setting('distant', 'address', 'none', 'HOST:PORT of the backend.'),
    Setting('behavior', 'str', '100:normal', 'the mix of handlers drawn per connection, '
            'like 20:delay,10:errors; the rest goes to normal.'),
    Setting('seed', 'int >= 0', 'none', 'seed of the draws, for reproducible runs.'),
    Setting('http', 'bool', 'false', 'serve the control API.'),
    Setting('http_host', 'str', 'localhost', 'host of the control API.'),
    Setting('http_port', 'int 0..65535', '8080', 'port of the control API.'),
    Setting('http_token', 'str', 'none', 'bearer token the control API requires.'),
    Setting('connect_timeout', 'seconds >= 0.001', str(CONNECT_TIMEOUT),
            'seconds to connect to the backend.'),
    Setting('max_connections', 'int >= 0', '0', 'connections open at once; 0: no limit.'),
    Setting('toxiproxy_api', 'str', 'none', "[HOST:]PORT to serve Toxiproxy's HTTP API on "
            '(8474 is its usual port), beside the proxies: its clients drive them.'),
    Setting('log_level', 'debug|info|warning|error', 'info', 'what is logged.'),
    Setting('log_output', 'str', 'stderr', 'stderr, stdout or a file path.'),
)}


def read_config(path, handlers, flags=()):
    """Read an ini file: return its [vaurien] options; register its [handler:NAME]s,
    then the --set `flags` over them, before the sections that name handlers.

    Every mistake raises ConfigError naming the file, the section and the key.
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    try:
        with open(path, encoding='utf-8-sig') as stream:   # a BOM is no section
            parser.read_file(stream)
    except OSError as exc:
        raise ConfigError('%s: cannot read: %s' % (path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise ConfigError('%s: not a UTF-8 text file' % path) from None
    except configparser.Error as exc:
        raise ConfigError('%s: %s' % (path, _config_problem(exc))) from None
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    options = {}
    named = [section for section in parser.sections() if section.startswith('handler:')
             and section[8:]]
    for section in named:
        _register_handler(section[8:], dict(parser.items(section)),
                          '%s: [%s]' % (path, section), handlers)
    _set_flags(flags, handlers)
    for section in parser.sections():
        where = '%s: [%s]' % (path, section)
        values = dict(parser.items(section))
        if section in named:
            continue
        if section == 'vaurien':
            for key, value in values.items():
                if key not in OPTIONS:
                    raise ConfigError('%s: unknown key %r (known: %s)' % (
                        where, key, ', '.join(OPTIONS)))
                options[key] = _convert_option(key, value, '%s %s' % (where, key))
        elif section.startswith('proxy:') and section[6:]:
            options.setdefault('proxies', {})[section[6:]] = _named_proxy(values, where,
                                                                          handlers)
        else:
            raise ConfigError('%s: unknown section (expected [vaurien], [proxy:NAME] or '
                              '[handler:NAME])' % where)
    if 'behavior' in options:
        _check_behavior(options['behavior'], handlers, '%s: [vaurien] behavior' % path)
    return options


#: What a [proxy:NAME] section takes; local defaults to a free port on loopback.
PROXY_KEYS = ('local', 'distant', 'behavior', 'seed')


def _named_proxy(values, where, handlers):
    """A [proxy:NAME] section (or a --proxy flag) as Proxy's keywords, checked."""
    unknown = sorted(set(values) - set(PROXY_KEYS))
    if unknown:
        raise ConfigError('%s: unknown key %r (known: %s)' % (where, unknown[0],
                                                               ', '.join(PROXY_KEYS)))
    if not values.get('distant'):
        raise ConfigError('%s: no distant: give the backend, distant = HOST:PORT' % where)
    spec = {key: _convert_option(key, value, '%s %s' % (where, key))
            for key, value in values.items()}
    spec.setdefault('local', '127.0.0.1:0')
    if 'behavior' in spec:
        _check_behavior(spec['behavior'], handlers, '%s behavior' % where)
    return spec


def _proxy_flag(text, handlers):
    """--proxy NAME=LOCAL,DISTANT, as a named proxy's keywords."""
    name, sep, addresses = text.partition('=')
    local, comma, distant = addresses.partition(',')
    if not sep or not comma or not name.strip():
        raise ConfigError('--proxy %s: expected NAME=LOCAL,DISTANT, like '
                          'redis=127.0.0.1:0,localhost:6379' % shown(text))
    return name.strip(), _named_proxy({'local': local.strip(), 'distant': distant.strip()},
                                      '--proxy %s' % name.strip(), handlers)


def _set_flags(flags, handlers):
    """--set HANDLER.SETTING=VALUE flags: lines of [handler:HANDLER] sections."""
    for text in flags:
        target, equals, value = text.partition('=')
        name, dot, key = target.strip().partition('.')
        if not equals or not dot or not name or not key.strip():
            raise ConfigError('--set %s: expected HANDLER.SETTING=VALUE, like '
                              'delay.sleep=200ms' % shown(text))
        _register_handler(name, {key.strip(): value.strip()}, '--set ' + name, handlers)


def _check_behavior(spec, handlers, where):
    try:
        Behavior(spec, handlers)
    except ConfigError as exc:
        raise ConfigError('%s = %s: %s' % (where, shown(spec), exc)) from None


def _config_problem(exc):
    """configparser's multi-line messages, on one line."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return 'line %d: %r comes before any [section]' % (exc.lineno, exc.line.strip())
    if isinstance(exc, configparser.ParsingError):
        lineno, line = exc.errors[0]
        return 'line %d: cannot parse %s' % (lineno, line.strip())
    if isinstance(exc, configparser.DuplicateSectionError):
        return 'line %s: section [%s] appears twice' % (exc.lineno, exc.section)
    if isinstance(exc, configparser.DuplicateOptionError):
        return 'line %s: [%s] %s appears twice' % (exc.lineno, exc.section, exc.option)
    return ' '.join(str(exc).split())


def _register_handler(name, values, where, handlers):
    dotted = values.pop('callable', None)
    if dotted is not None:
        try:
            handlers[name] = Handler(name, load_callable(dotted))
        except ConfigError as exc:
            raise ConfigError('%s callable = %s: %s' % (where, shown(dotted), exc)) from None
    elif name not in handlers:
        raise ConfigError('%s: %s; give %s to add one' % (
            where, unknown_handler(name, handlers),
            '--set %s.callable=package.module.function' % name if where.startswith('--set')
            else '"callable = package.module.function"'))
    handler = handlers[name]
    handler.origin = where
    for key, value in values.items():
        try:
            handler.settings = handler.validate({key: value})
        except ConfigError as exc:
            raise ConfigError('%s %s = %s: %s' % (where, key, shown(value), exc)) from None


def _convert_option(key, value, where):
    try:
        value = OPTIONS[key].convert(value)
    except ValueError as exc:
        raise ConfigError('%s = %s: %s' % (where, shown(value), exc)) from None
    if key == 'http_token' and not value:   # "--http-token $UNSET": no silent open API
        raise ConfigError('%s is empty (an unset variable?): give a token, or leave it out'
                          % where)
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog='vaurien', description='Vaurien, the Chaos TCP proxy: relays --local to '
        '--distant and delays, breaks, hangs, cuts or corrupts the traffic on demand.',
        epilog='Options given here override those of --config.  '
        'Example: vaurien --local localhost:8000 --distant google.com:80 --behavior 20:delay.  '
        'In place of toxiproxy-server: vaurien toxiproxy [-host HOST] [-port PORT] '
        '[-config FILE.json] (vaurien toxiproxy -help).')
    add = parser.add_argument
    for name, setting in OPTIONS.items():
        flag = '--' + name.replace('_', '-')
        if setting.type == 'bool':
            add(flag, action='store_const', const='true', help=setting.help)
        else:
            add(flag, metavar=name.upper(), help='%s (default: %s)' % (
                setting.help, 'none' if setting.default is None else setting.default))
    add('--config', metavar='FILE', help='an ini file with [vaurien], [proxy:NAME] and '
        '[handler:NAME] sections.')
    add('--proxy', action='append', metavar='NAME=LOCAL,DISTANT', help='one more proxy, named '
        'NAME (again for more), e.g. redis=127.0.0.1:0,localhost:6379; its control API is '
        '/proxies/NAME.')
    add('--set', action='append', metavar='HANDLER.SETTING=VALUE', help="a handler's setting, "
        'as in its [handler:HANDLER] section of --config (again for more), e.g. '
        'delay.sleep=200ms; HANDLER.callable=package.module.function adds a handler.')
    add('--list-handlers', action='store_true', help='list the handlers and their settings.')
    add('--demo', action='store_true', help='proxy to a built-in HTTP backend, with chaos, '
        'on free ports unless --local or --http-port say otherwise.')
    add('--exit-on-eof', action='store_true', help='exit when standard input closes: a '
        'parent that holds a pipe to it is sure the proxy never outlives it (start_proxy() '
        'does so).')
    add('--version', action='version', version='vaurien ' + __version__)
    return parser


def resolve(args):
    """Defaults, then --config, then flags: the options and the handler registry."""
    handlers = default_handlers()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    options = {name: setting.default for name, setting in OPTIONS.items()}
    if args.config:
        from_file = read_config(args.config, handlers, args.set or ())
    else:
        from_file = {}
        _set_flags(args.set or (), handlers)
    options.update(from_file)
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            options[name] = _convert_option(name, value, '--' + name.replace('_', '-'))
    if args.demo:       # free ports, unless told: a demo never collides with anything
        if args.distant is not None or 'distant' in from_file:
            raise ConfigError('--demo proxies to its own backend, not to %s: leave out '
                              '--demo to proxy to yours' % (
                                  '--distant' if args.distant is not None
                                  else 'distant in %s' % args.config))
        for name, value in (('behavior', DEMO_BEHAVIOR), ('local', '127.0.0.1:0'),
                            ('http_port', 0)):
            if getattr(args, name) is None and name not in from_file:
                options[name] = value
        options['http'] = True
    if args.behavior is not None:
        _check_behavior(args.behavior, handlers, '--behavior')
    strays = [name for name in ('http_host', 'http_port', 'http_token')
              if name in from_file or getattr(args, name) is not None]
    if strays and not options['http']:
        raise ConfigError('%s set, but the control API is off: add --http (or http = true '
                          'in [vaurien])' % ', '.join('--' + name.replace('_', '-')
                                                      for name in strays))
    options['proxies'] = dict(from_file.get('proxies', {}))
    for name, spec in (_proxy_flag(text, handlers) for text in args.proxy or ()):
        if name in options['proxies']:
            raise ConfigError('proxy %r is given twice (--proxy, [proxy:%s]): give each one '
                              'once' % (name, name))
        options['proxies'][name] = spec
    if options['proxies'] and not options['distant'] and not args.demo:
        strays = [name for name in ('local', 'behavior', 'seed')
                  if name in from_file or getattr(args, name) is not None]
        if strays:
            raise ConfigError('%s: for the proxy of --distant, and there is none: give '
                              '--distant, or set them in a [proxy:NAME] section'
                              % ', '.join('--' + name for name in strays))
    if options['toxiproxy_api']:
        options['toxiproxy_api'] = api_address(options['toxiproxy_api'], '--toxiproxy-api')
    if not options['distant'] and not options['proxies'] and not args.demo \
            and not args.list_handlers:
        raise ConfigError('no backend: give --distant HOST:PORT, or --proxy '
                          'NAME=LOCAL,DISTANT (or try --demo)')
    return options, handlers


def list_handlers(handlers):
    """The text of --list-handlers, from the handlers' docstrings."""
    lines = []
    for name in sorted(handlers):
        handler = handlers[name]
        lines.append('%s: %s' % (name, handler.summary))
        for key, setting in (handler.schema or {}).items():
            lines.append('    %s' % setting.describe())
            if handler.settings.get(key) != setting.default:
                lines.append('        configured: %s' % handler.settings[key])
    lines.append(UNITS_NOTE)
    return '\n'.join(lines)


def setup_logging(level, output):
    if output == 'stderr':
        stream = logging.StreamHandler(sys.stderr)
    elif output == 'stdout':
        stream = logging.StreamHandler(sys.stdout)
    else:
        try:
            stream = logging.FileHandler(output)
        except OSError as exc:
            raise ConfigError('log output %s: %s' % (output, exc.strerror)) from None
    stream.setFormatter(logging.Formatter('%(asctime)s vaurien[%(process)d] %(levelname)s '
                                          '%(message)s'))
    log.handlers[:] = [stream]
    log.setLevel(level.upper())
    log.propagate = False


def api_address(text, where):
    """[HOST:]PORT, as --toxiproxy-api takes it: (host, port), localhost by default."""
    text = str(text)
    try:
        return parse_address(text if ':' in text else 'localhost:' + text, where)
    except ConfigError:
        raise ConfigError('%s %s: expected [HOST:]PORT, like 8474 or 127.0.0.1:8474'
                          % (where, shown(text))) from None


def main(argv=None):
    """The `vaurien` command: returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['toxiproxy']:
        return toxiproxy_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.exit_on_eof and sys.stdin is not None and sys.stdin.isatty():
            raise ConfigError('--exit-on-eof watches standard input, which is a terminal '
                              'here: give it a pipe from the parent process')
        options, handlers = resolve(args)
        if args.list_handlers:
            print(list_handlers(handlers))
            return 0
        setup_logging(options['log_level'], options['log_output'])
        for handler in handlers.values():
            if handler.origin:
                log.info('handler %s configured by %s (%s)', handler.name, handler.origin,
                         _settings_text(handler.settings))
        raise_descriptor_limit()
        demo = DemoBackend() if args.demo else None
        if demo:
            options['distant'] = format_address(demo.server_address)
        proxy, *others = _make_proxies(options, handlers)
    except ConfigError as exc:
        print('vaurien: error: %s' % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print('vaurien: error: %s' % (exc.strerror or exc), file=sys.stderr)
        return 1
    if demo:
        proxy.connection_log_level = logging.INFO    # which handler each request met
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        proxy.start()
    except (OSError, ConfigError) as exc:
        for each in [proxy] + others:
            each.stop()
        print('vaurien: error: cannot serve the control API: %s' % (
            getattr(exc, 'strerror', None) or exc), file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    for each in [proxy] + others:
        if proxy.control_server is not None:
            proxy.control_server.proxies[each.name] = each
        if each is not proxy or each.name != 'default':   # named: a line before the ready one
            print('Vaurien proxy %s: %s -> %s; behavior %s' % (
                each.name, format_address(each.address), format_address(each.distant),
                each.behavior), file=sys.stderr, flush=True)
    toxiproxy = None
    if options['toxiproxy_api']:
        try:
            toxiproxy = _serve_toxiproxy(options, handlers, [proxy] + others)
        except OSError as exc:
            for each in [proxy] + others:
                each.stop()
            print('vaurien: error: cannot serve the Toxiproxy API: %s' % (
                exc.strerror or exc), file=sys.stderr)
            return 1
    _announce(proxy, demo)
    if args.exit_on_eof:
        threading.Thread(target=_stop_at_eof, args=(stop,), name='vaurien-stdin',
                         daemon=True).start()
    while not stop.wait(1.0):
        pass
    log.info('stopping')
    if toxiproxy is not None:
        toxiproxy.stop(proxies=True)    # those made through it too
    for each in [proxy] + others:
        each.stop()
    if demo:
        demo.shutdown()
    return 0


def _serve_toxiproxy(options, handlers, proxies):
    """Toxiproxy's API beside the proxies, sharing them (and the control API's registry,
    when there is one); its address on a line before the ready one."""
    control = proxies[0].control_server
    registry = control.proxies if control else {each.name: each for each in proxies}
    server = ToxiproxyServer(options['toxiproxy_api'], registry,
                             control.lock if control else None, handlers,
                             connect_timeout=options['connect_timeout'],
                             max_connections=options['max_connections']).start()
    print('%shttp://%s' % (_TOXIPROXY_LINE, format_address(server.server_address)),
          file=sys.stderr, flush=True)
    return server


def toxiproxy_main(argv):
    """`vaurien toxiproxy`: Toxiproxy's API, and no proxy until a client makes one, as
    toxiproxy-server starts; its flags (-host, -port, -config) are toxiproxy-server's."""
    parser = argparse.ArgumentParser(
        prog='vaurien toxiproxy', description="Serve Toxiproxy's HTTP API: its clients "
        'create proxies and toxics, which Vaurien relays and applies.', add_help=False)
    parser.add_argument('-h', '-help', '--help', action='help',
                        help='show this help message and exit.')
    parser.add_argument('-version', '--version', action='version', version='vaurien %s, '
                        "Toxiproxy's API %s" % (__version__, TOXIPROXY_VERSION))
    for flag in ('-proxy-metrics', '-runtime-metrics'):
        parser.add_argument(flag, action='store_true', help='accepted, as toxiproxy-server '
                            "takes it; /metrics always serves Vaurien's metrics.")
    parser.add_argument('-host', '--host', default='localhost',
                        help='host of the API (default: localhost).')
    parser.add_argument('-port', '--port', default='8474', help='port of the API (default: '
                        '8474; 0 picks a free one).')
    parser.add_argument('-config', '--config', metavar='FILE.json', help='proxies to create '
                        'at start: a JSON list, as toxiproxy-server -config and POST '
                        '/populate take.')
    for name in ('seed', 'connect_timeout', 'max_connections', 'log_level', 'log_output'):
        setting = OPTIONS[name]
        flags = ['--' + name.replace('_', '-')]
        if name == 'seed':
            flags.insert(0, '-seed')     # toxiproxy-server's
        parser.add_argument(*flags, metavar=name.upper(),
                            default=setting.default, help='%s (default: %s)' % (
                                setting.help, 'none' if setting.default is None
                                else setting.default))
    parser.add_argument('--exit-on-eof', action='store_true', help='exit when standard '
                        'input closes.')
    args = parser.parse_args(argv)
    try:
        options = {name: _convert_option(name, getattr(args, name), '--' + name.replace(
            '_', '-')) if getattr(args, name) is not None else None for name in (
            'seed', 'connect_timeout', 'max_connections', 'log_level', 'log_output')}
        address = api_address('%s:%s' % (args.host, args.port), '-host/-port')
        setup_logging(options['log_level'], options['log_output'])
        raise_descriptor_limit()
        server = ToxiproxyServer(address, seed=options['seed'],
                                 connect_timeout=options['connect_timeout'],
                                 max_connections=options['max_connections'])
    except ConfigError as exc:
        print('vaurien: error: %s' % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print('vaurien: error: %s' % (exc.strerror or exc), file=sys.stderr)
        return 1
    if args.config and not _populate_from(server, args.config):
        server.stop(proxies=True)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print('Vaurien ready: Toxiproxy API http://%s' % format_address(server.server_address),
          file=sys.stderr, flush=True)
    if args.exit_on_eof:
        threading.Thread(target=_stop_at_eof, args=(stop,), name='vaurien-stdin',
                         daemon=True).start()
    while not stop.wait(1.0):
        pass
    log.info('stopping')
    server.stop(proxies=True)
    return 0


def _populate_from(server, path):
    """Create the proxies of a toxiproxy-server -config file; False after an error."""
    try:
        with open(path, 'rb') as config:
            status, answer = server.populate(config.read(), 'the config file %s' % path)
    except OSError as exc:
        print('vaurien: error: %s: cannot read: %s' % (path, exc.strerror or exc),
              file=sys.stderr)
        return False
    if status != 201:
        print('vaurien: error: %s: %s' % (path, answer['error']), file=sys.stderr)
        return False
    for proxy in answer['proxies'] or ():
        print('Vaurien proxy %s: %s -> %s' % (proxy['name'], proxy['listen'],
                                              proxy['upstream']), file=sys.stderr, flush=True)
    return True


def _make_proxies(options, handlers):
    """The proxies of the options: [vaurien]'s (or --distant's) first, which serves the
    control API for all, then the named ones; the first named one serves it without
    a [vaurien] one."""
    if options['distant'] and 'default' in options['proxies']:
        raise ConfigError('"default" names the proxy of [vaurien] (or of --distant, or the '
                          'demo): give the other one another name')
    common = {key: options[key] for key in ('connect_timeout', 'max_connections')}
    control = {key: options[key] for key in ('http', 'http_host', 'http_port', 'http_token')}
    specs = [dict(name='default', **{key: options[key] for key in (
        'local', 'distant', 'behavior', 'seed')})] if options['distant'] else []
    specs += [dict(spec, name=name) for name, spec in options['proxies'].items()]
    proxies = []
    try:
        for index, spec in enumerate(specs):
            proxies.append(Proxy(handlers=handlers, **dict(
                spec, **common, **(control if index == 0 else {}))))
    except BaseException:
        for proxy in proxies:
            proxy.stop()
        raise
    return proxies


def _stop_at_eof(stop):
    """Read standard input to its end (the parent died, or closed it), then stop."""
    with contextlib.suppress(OSError, ValueError, AttributeError):   # no stdin at all
        while os.read(sys.stdin.fileno(), 4096):
            pass
    log.info('standard input closed (--exit-on-eof): stopping')
    stop.set()


def raise_descriptor_limit():
    """Raise the soft limit of open files to the hard one, as Go programs and haproxy do.

    Each relayed connection takes two descriptors; a desktop's soft limit of
    1024 would cap the proxy near 500 connections.
    """
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug('open files limit: %s (was %s)', hard, soft)
    except (ImportError, ValueError, OSError) as exc:
        log.debug('open files limit left as it is: %s', exc)


def _announce(proxy, demo):
    """The ready line start_proxy() waits for, then the demo's how-to, flushed."""
    control = proxy.control
    print('Vaurien ready: proxy %s -> %s%s; behavior %s' % (
        format_address(proxy.address), format_address(proxy.distant),
        ', control http://%s' % format_address(control) if control else '', proxy.behavior),
        file=sys.stderr, flush=True)
    if demo:
        local, control = format_address(proxy.address), format_address(control)
        print('\nDemo: a built-in HTTP backend answers behind the proxy; each connection draws\n'
              'its handler from %s.  Try, several times:\n\n'
              '    curl -si http://%s/\n\n'
              'Each connection is logged below with the handler it met.  Then make every\n'
              'request fail, and go back to the mix:\n\n'
              '    curl -d errors http://%s/handler\n'
              '    curl -d %s http://%s/behavior\n\n'
              'Ctrl-C stops.' % (proxy.behavior, local, control, proxy.behavior, control),
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Demo backend
# ---------------------------------------------------------------------------

DEMO_BEHAVIOR = '30:delay,30:errors'


class _DemoPage(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True

    def do_GET(self):
        self.server.served += 1
        body = ('Hello from the Vaurien demo backend: request #%d, %s\n' % (
            self.server.served, self.path)).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug('demo backend: ' + format, *args)


class DemoBackend(http.server.ThreadingHTTPServer):
    """A small HTTP server on an ephemeral loopback port, serving in a thread."""

    request_queue_size = 128

    def __init__(self):
        super().__init__(('127.0.0.1', 0), _DemoPage)
        self.served = 0
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True,
                         name='vaurien-demo').start()



# ---------------------------------------------------------------------------
# pytest plugin: "pytest -p vaurien", or pytest_plugins = ['vaurien']
# ---------------------------------------------------------------------------

def pytest_configure(config):
    """pytest's call, when this module is loaded as a plugin: register the fixtures.

    They are made here, from the pytest that calls this, so that vaurien
    never imports it: importing vaurien costs nothing without pytest.
    """
    config.pluginmanager.register(_pytest_fixtures(sys.modules['pytest']),
                                  'vaurien-fixtures')


def _pytest_fixtures(pytest):
    """Fixtures that start proxies and stop them after each test; a failing test's
    report gets their log."""

    class _LogRecorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []
            self.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))

        def emit(self, record):
            self.lines.append(self.format(record))

    def logs_of(item):
        if not hasattr(item, '_vaurien_logs'):
            item._vaurien_logs = []
        return item._vaurien_logs

    class Fixtures:
        @pytest.fixture
        def vaurien_proxy(self, request):
            """make(distant, **options): a started in-process Proxy on an ephemeral
            loopback port (its control API too, with http=True), stopped after the test."""
            proxies, recorder = [], _LogRecorder()
            level = log.level
            log.addHandler(recorder)
            if not log.isEnabledFor(logging.INFO):
                log.setLevel(logging.INFO)
            logs_of(request.node).append(('in-process proxies',
                                          lambda: '\n'.join(recorder.lines)))

            def make(distant, *, local='127.0.0.1:0', **options):
                options.setdefault('http_host', '127.0.0.1')
                options.setdefault('http_port', 0)
                proxies.append(Proxy(local, distant, **options))
                return proxies[-1].start()
            yield make
            for proxy in proxies:
                proxy.stop()
            log.removeHandler(recorder)
            log.setLevel(level)

        @pytest.fixture
        def vaurien_process(self, request):
            """make(distant, **options): start_proxy() on ephemeral loopback ports (the
            proxy and its control API), stopped after the test."""
            handles = []

            def make(distant, **options):
                options.setdefault('local', '127.0.0.1:0')
                if options.get('http', True):
                    options.setdefault('http_host', '127.0.0.1')
                    options.setdefault('http_port', 0)
                handle = start_proxy(distant=distant, **options)
                handles.append(handle)
                logs_of(request.node).append(('proxy pid %d' % handle, lambda: handle.output))
                return handle
            yield make
            for handle in handles:
                handle.stop()

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_makereport(self, item, call):
            report = (yield).get_result()
            if report.failed:
                for title, text in getattr(item, '_vaurien_logs', ()):
                    report.sections.append(('vaurien log: ' + title, text() or '(nothing)'))

    return Fixtures()


if __name__ == '__main__':
    sys.modules.setdefault('vaurien', sys.modules['__main__'])
    sys.exit(main())
