"""MySQL / MariaDB handlers: "MySQL server has gone away".

The best known MySQL failure in web applications: a pooled connection that
the server dropped (wait_timeout, a restart, a failover, max_allowed_packet)
is used for a query, and the driver reports ``2013 Lost connection to MySQL
server during query`` or ``2006 MySQL server has gone away``.  Connection
pools must notice, reconnect and retry (or fail cleanly).

MySQL framing, as far as these handlers need it: every packet is a 3-byte
little-endian payload length, a 1-byte sequence id, then the payload.  The
server speaks first (greeting, sequence 0); the client answers with sequence
1, and the login goes on with growing sequence ids until the server's OK.
Each command after the login starts again at sequence 0, and its first
payload byte is the command (0x03 COM_QUERY, 0x0e COM_PING, 0x01 COM_QUIT,
0x16 COM_STMT_PREPARE...).  So a client packet with sequence 0 is a command,
unless it continues a packet of 16 MiB - 1 (a larger payload is split into
maximal packets, whose sequence id may wrap to 0).

TLS: a client that asks for TLS (an SSLRequest, the 32-byte first packet)
encrypts everything after it; such connections are relayed untouched, and
never fail.  Test with TLS off (``ssl_disabled=True`` in PyMySQL,
``--ssl=0``/``--skip-ssl`` for the mariadb/mysql clients,
``ssl-mode=DISABLED``).
"""

import vaurien

COM_QUERY = 0x03
MAX_PAYLOAD = 0xFFFFFF      # a packet this long is continued by the next one
SSL_REQUEST_LENGTH = 32


@vaurien.traits(blocking=False)
def gone_away(source, dest, to_backend, name, settings, proxy):
    """Relays the login and `queries` queries, then drops the connection on the next one.

    The greeting and login go through untouched (whatever the auth plugin),
    then the first `queries` COM_QUERY commands of the connection are
    relayed.  The next one never reaches the server: the connection is
    closed without an answer, and the client reports "Lost connection to
    MySQL server during query" (2013) or "MySQL server has gone away"
    (2006).  With `on` any, the next command of any kind after those queries
    (a ping, a COM_INIT_DB, a prepared statement) finds the server gone too;
    with query, other commands keep passing.  The default, 0, drops the
    first query after the login: drivers that send queries while they
    connect already fail there (PyMySQL's connect() sends SET NAMES, then
    SET AUTOCOMMIT: 2 queries).  TLS connections are relayed untouched.  Set
    it before the connections open, or between commands: a connection that
    meets it in the middle of a packet is misread.

    Settings:
      queries (int >= 0, default 0): COM_QUERY commands answered on each connection before it goes away.
      on (query|any, default query): the command that finds the server gone: the next query, or any next command.
    """
    data = proxy.get_data(source)
    state = source.connection.state(name)
    if not to_backend or state.get('tls'):
        return dest.sendall(data)
    if not data:   # the client left: what was held back goes, then the EOF
        dest.sendall(state.pop('pending', b''))
        return None
    buf = state.pop('pending', b'') + data
    pos = 0
    while pos < len(buf):
        skip = state.get('skip', 0)
        if skip:                       # the rest of a packet already judged
            step = min(skip, len(buf) - pos)
            state['skip'] = skip - step
            pos += step
            continue
        length = int.from_bytes(buf[pos:pos + 3], 'little')
        if len(buf) - pos < 4 or (buf[pos + 3] == 0 and length and len(buf) - pos < 5):
            state['pending'] = buf[pos:]   # a header (and command byte) still to come
            break
        sequence, continued = buf[pos + 3], state.get('continued', False)
        first, state['seen'] = not state.get('seen'), True
        if first and sequence == 1 and length == SSL_REQUEST_LENGTH:
            state['tls'] = True            # an SSLRequest: TLS from here on
            return dest.sendall(buf)
        if sequence == 0 and not continued and length:
            command = buf[pos + 4]
            answered = state.get('queries', 0)
            if answered >= settings['queries'] and (
                    command == COM_QUERY or settings['on'] == 'any'):
                dest.sendall(buf[:pos])     # what came before this command, and no more
                return False                # closed without answering
            if command == COM_QUERY:
                state['queries'] = answered + 1
        state['continued'] = length == MAX_PAYLOAD
        state['skip'] = 4 + length
    dest.sendall(buf[:pos])
