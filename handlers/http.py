"""HTTP handlers: faults that hit some request paths only.

A real backend is rarely down as a whole: one slow report endpoint, one
route behind a failing dependency.  These handlers choose by the request
target (path and query string) with a regular expression.

How requests are found: HTTP/1.1 keeps connections alive, so the choice is
made per request, not per connection.  A client chunk that begins with a
request line (``GET /path HTTP/1.1``) starts a request and is judged by its
target; a chunk that does not (the rest of a large header, a body) belongs
to the request before it.  This is right for clients that send a request and
wait for its answer before the next one, which is what browsers, requests,
urllib3 and http.client do.  Its limit: with pipelining (several requests in
one chunk) only the first request line of the chunk is read, and a request
line split across two TCP segments is not recognised.  HTTPS (TLS) traffic
is opaque: nothing matches, everything passes.
"""

import functools
import re

import vaurien

_REQUEST_LINE = re.compile(
    rb'^(?:GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) (\S+) HTTP/\d')


@functools.lru_cache(maxsize=64)
def _compiled(pattern):
    return re.compile(pattern)


def _check_pattern(settings):
    """The schema types `pattern` as a str; this checks, when it is set, that it is a regex."""
    try:
        _compiled(settings['pattern'])
    except re.error as exc:
        raise ValueError('pattern %r is not a regular expression: %s'
                         % (settings['pattern'], exc)) from None


def _matches(source, name, settings, data):
    """Whether this client chunk belongs to a request whose target matches.

    A chunk that starts a request decides; other chunks follow the request
    they continue (kept per connection).
    """
    state = source.connection.state((name, 'request'))
    line = _REQUEST_LINE.match(data)
    if line:
        target = line.group(1).decode('latin-1')
        state['match'] = _compiled(settings['pattern']).search(target) is not None
    return state.get('match', False)


@vaurien.traits(check=_check_pattern, blocking=False)
def slow_paths(source, dest, to_backend, name, settings, proxy):
    """Delays requests whose path matches `pattern` by `sleep` seconds; others pass.

    The matching request reaches the backend `sleep` seconds late, so its
    answer comes that much later: a slow endpoint.  Requests to other paths,
    on the same keep-alive connection or another, are not delayed (unless
    they queue behind a delayed one on the same connection: bytes keep their
    order).  The pattern is searched in the request target, query included:
    ``^/reports/``, ``/export\\b``, ``[?&]limit=``.

    Settings:
      pattern (str, default ^/slow): regular expression searched in the request target.
      sleep (seconds >= 0, default 2): seconds a matching request is held.
    """
    data = proxy.get_data(source)
    if to_backend and data and _matches(source, name, settings, data):
        return dest.sendall(data, delay=settings['sleep'])
    dest.sendall(data)


@vaurien.traits(backend=False, check=_check_pattern, blocking=False)
def status_on_paths(source, dest, to_backend, name, settings, proxy):
    """Answers `status` to requests whose path matches `pattern`; others pass.

    A matching request never reaches the backend: the proxy answers a
    complete HTTP/1.1 response with `status` (Connection: close, with a
    Retry-After header when `retry_after` is set) and closes the connection,
    as a load balancer does in front of a failing pool.  Other requests are
    relayed.  The backend is connected only when a request is relayed.

    Settings:
      pattern (str, default ^/): regular expression searched in the request target.
      status (int 400..599, default 503): HTTP status answered.
      message (str, default ): body text; empty for the status' reason phrase.
      retry_after (int >= 0, default 0): seconds sent as Retry-After; 0 sends none.
    """
    data = proxy.get_data(source)
    if to_backend and data and _matches(source, name, settings, data):
        answer = vaurien.http_error(settings['status'], settings['message'])
        if settings['retry_after']:
            head, _, rest = answer.partition(b'\r\n')
            answer = b'%s\r\nRetry-After: %d\r\n%s' % (head, settings['retry_after'], rest)
        source.sendall(answer)
        return False   # the rest of the request (a body) is read and dropped
    dest.sendall(data)
