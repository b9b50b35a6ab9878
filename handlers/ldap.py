"""LDAP handlers: a directory that fails under load.

An LDAP server (OpenLDAP, Active Directory, 389-ds) at its limit does not
refuse connections: it accepts them and answers operations with result code
51, busy ("the server is too busy to service the operation").  Applications
that authenticate users with an LDAP bind must tell that apart from "wrong
password" (49, invalidCredentials), and retry or fail with a 503, not a 401.

LDAP messages are BER: ``30 LEN  02 LEN messageID  [APPLICATION n] LEN ...``.
The handler reads just the message length, the messageID and the operation
tag, enough to frame messages across chunks and answer each one; LDAP
responses carry the messageID of their request, so they may come in any
order.  LDAPS, and StartTLS once it has begun, are opaque: relayed untouched.
"""

import threading
import weakref

import vaurien

BUSY = 51

#: request tag -> response tag (RFC 4511, section 4.2 to 4.12)
RESPONSES = {
    0x60: 0x61,   # bindRequest -> bindResponse
    0x63: 0x65,   # searchRequest -> searchResDone
    0x66: 0x67,   # modifyRequest -> modifyResponse
    0x68: 0x69,   # addRequest -> addResponse
    0x4a: 0x6b,   # delRequest -> delResponse
    0x6c: 0x6d,   # modDNRequest -> modDNResponse
    0x6e: 0x6f,   # compareRequest -> compareResponse
    0x77: 0x78,   # extendedReq -> extendedResp
}
NO_RESPONSE = (0x42, 0x50)   # unbindRequest, abandonRequest
GENERIC_RESPONSE = 0x78      # extendedResp, for any other operation


def _tlv(tag, value):
    """One BER element: tag, definite length, value."""
    size = len(value)
    if size < 0x80:
        return bytes((tag, size)) + value
    octets = size.to_bytes((size.bit_length() + 7) // 8, 'big')
    return bytes((tag, 0x80 | len(octets))) + octets + value


def ldap_result(message_id, request_tag, code, message=''):
    """The LDAPMessage answering request `request_tag` with LDAPResult `code`.

    `message_id` is the content octets of the request's INTEGER, echoed as
    they came.  Returns b'' for unbind and abandon, which get no answer.
    """
    if request_tag in NO_RESPONSE:
        return b''
    result = (_tlv(0x0a, bytes((code,))) + _tlv(0x04, b'')     # resultCode, matchedDN
              + _tlv(0x04, message.encode('utf-8')))             # diagnosticMessage
    operation = _tlv(RESPONSES.get(request_tag, GENERIC_RESPONSE), result)
    return _tlv(0x30, _tlv(0x02, message_id) + operation)


def _length(buf, at):
    """A BER length at `at`: (length, offset after it), or None if cut off."""
    if at >= len(buf):
        return None
    first = buf[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7f
    if not 0 < count <= 4:   # indefinite lengths are not allowed in LDAP
        raise ValueError('not an LDAP length')
    if at + 1 + count > len(buf):
        return None
    return int.from_bytes(buf[at + 1:at + 1 + count], 'big'), at + 1 + count


def message_head(buf, pos):
    """(total length, messageID octets, operation tag) of the LDAPMessage at `pos`.

    None when the head is not all in `buf` yet; ValueError when the bytes
    are not an LDAPMessage (TLS, garbage).
    """
    if buf[pos] != 0x30:
        raise ValueError('not an LDAPMessage')
    outer = _length(buf, pos + 1)
    if outer is None or outer[1] >= len(buf):
        return None
    length, body = outer
    if buf[body] != 0x02:
        raise ValueError('no messageID')
    inner = _length(buf, body + 1)
    if inner is None or inner[1] + inner[0] >= len(buf):
        return None
    id_length, at = inner
    return (body - pos) + length, buf[at:at + id_length], buf[at + id_length]


# -- connections open through the handler, per proxy and handler name ---------

_lock = threading.Lock()
_open = weakref.WeakKeyDictionary()   # proxy -> {handler name: {connection index}}


def _count(conn, name, proxy):
    """`conn` is open through handler `name`: count it (again: a no-op)."""
    with _lock:
        _open.setdefault(proxy, {}).setdefault(name, set()).add(conn.index)


def _forget(conn, name, proxy):
    """`conn` ended, or its client left: it no longer counts.  Idempotent."""
    with _lock:
        _open.get(proxy, {}).get(name, set()).discard(conn.index)


def _open_before(conn, name, proxy):
    """How many connections counted for handler `name` of `proxy` were
    accepted before `conn`."""
    with _lock:
        return sum(1 for index in _open.get(proxy, {}).get(name, ()) if index < conn.index)


def _count_at_connect(client, backend, name, settings, proxy):
    _count(client.connection, name, proxy)


@vaurien.traits(on_connect=_count_at_connect, on_close=_forget, blocking=False)
def busy(source, dest, to_backend, name, settings, proxy):
    """Answers busy (51) to every request of connections over `max_connections`, then closes.

    Connections through this handler are counted, per proxy, while they are
    open: from when they open, or first meet the handler if it was set while
    they were open, until they end or their client closes its side (even if
    another handler is in force for them meanwhile).  The first
    `max_connections` of those still open are relayed untouched; each
    connection beyond them, at its next requests, gets for each request an
    LDAPResult with resultCode 51 (busy) and the request's messageID, then
    is closed.  The response matches the request: bindResponse for a bind,
    searchResDone for a search, modify/add/del/modDN/compare/extended
    responses; an unknown operation gets an extendedResp; unbind and abandon
    get none.  Once older connections close, newer ones are served again.

    Settings:
      max_connections (int >= 0, default 10): connections served at once; those beyond get busy.
      message (str, default server is busy): diagnosticMessage of the busy results.
    """
    conn = source.connection
    if (source if to_backend else dest).eof_read:   # the client closed its side:
        _forget(conn, name, proxy)                   # it no longer loads the server
    else:
        _count(conn, name, proxy)
    data = proxy.get_data(source)
    state = conn.state(name)
    if not to_backend or state.get('opaque'):
        return dest.sendall(data)
    if not data:
        dest.sendall(state.pop('pending', b''))
        return None
    buf = state.pop('pending', b'') + data
    pos, answers, overloaded = 0, [], None
    while pos < len(buf):
        skip = state.get('skip', 0)
        if skip:          # the rest of a message whose head came earlier
            step = min(skip, len(buf) - pos)
            state['skip'] = skip - step
            if not overloaded:
                dest.sendall(buf[pos:pos + step])
            pos += step
            continue
        try:
            head = message_head(buf, pos)
        except ValueError:   # TLS began, or this is not LDAP: relay as is from here
            state['opaque'] = True
            return dest.sendall(buf[pos:])
        if head is None:
            state['pending'] = buf[pos:]
            break
        total, message_id, operation = head
        if overloaded is None:   # decided once, at the first request of the chunk
            overloaded = _open_before(conn, name, proxy) >= settings['max_connections']
        if overloaded:
            answers.append(ldap_result(message_id, operation, BUSY, settings['message']))
        else:
            dest.sendall(buf[pos:pos + min(total, len(buf) - pos)])
        state['skip'] = total - min(total, len(buf) - pos)
        pos += min(total, len(buf) - pos)
    if overloaded:   # answers (none for unbind, abandon), then the close
        source.sendall(b''.join(answers))
        _forget(conn, name, proxy)   # at once, not when the close is over
        return False
