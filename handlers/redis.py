"""Redis handlers: the failures a Redis client meets after a restart.

A Redis server that restarts with persistence answers every command with
``-LOADING Redis is loading the dataset in memory`` until its dataset is
read back from disk.  Clients see ``BusyLoadingError`` (redis-py),
``LOADING`` replies (Jedis, go-redis...), and their retry logic is tested.
"""

import time

LOADING_REPLY = b'-LOADING Redis is loading the dataset in memory\r\n'
MAX_LINE = 64 * 1024   # longest inline command or RESP header line kept while counting


def _idle(parser):
    return not parser['items'] and not parser['skip'] and not parser['line']


def count_commands(parser, data, until_idle=False):
    """Count the RESP commands that `data` completes; return (count, bytes used).

    `parser` is a dict kept per connection ({} to start): it carries a
    command cut between chunks, so pipelined commands are counted one by one
    whatever the TCP segmentation.  Both RESP arrays (``*2\\r\\n$3\\r\\nGET...``,
    what client libraries send) and inline commands (``PING\\r\\n``, what
    telnet sends) are counted; bulk payloads are skipped, not buffered.  With
    `until_idle`, stop as soon as no command is in progress (at once if none
    is).  Input that is not RESP counts as one command and is consumed.
    """
    for key, empty in (('items', 0), ('skip', 0), ('line', b'')):
        parser.setdefault(key, empty)
    count = pos = 0
    while pos < len(data):
        if until_idle and _idle(parser):
            break
        if parser['skip']:   # inside a bulk string: its bytes and CRLF
            step = min(parser['skip'], len(data) - pos)
            pos += step
            parser['skip'] -= step
            if not parser['skip'] and not parser['items']:
                count += 1
            continue
        end = data.find(b'\n', pos)
        if end < 0:
            parser['line'] += data[pos:]
            pos = len(data)
            if len(parser['line']) > MAX_LINE:   # Redis too calls this a protocol error
                parser.update(items=0, skip=0, line=b'')
                count += 1
            break
        line = (parser['line'] + data[pos:end]).rstrip(b'\r')
        parser['line'] = b''
        pos = end + 1
        try:
            if parser['items']:          # a bulk string header: $LENGTH
                if line[:1] != b'$' or int(line[1:]) < 0:
                    raise ValueError(line)
                parser['items'] -= 1
                parser['skip'] = int(line[1:]) + 2
            elif line[:1] == b'*':       # an array: its number of arguments
                parser['items'] = max(0, int(line[1:]))   # Redis ignores *0 and *-1
            elif line.strip():           # an inline command
                count += 1
        except ValueError:               # not RESP: one command, the rest dropped
            parser.update(items=0, skip=0, line=b'')
            return count + 1, len(data)
    return count, pos


def loading(source, dest, to_backend, name, settings, proxy):
    """Answers -LOADING to every command for the first `warmup` seconds, then relays.

    While loading, commands never reach the backend: each one, pipelined
    ones included, gets its own ``-LOADING Redis is loading the dataset in
    memory`` error, in order.  The clock starts when each connection opens
    (since connection), or when the handler was set (since handler: a
    server restart that every connection, live or new, sees end at the same
    moment).  A command that started during the warmup gets its error even
    if its last bytes come later; the connection then relays everything,
    unchanged, for good.

    Settings:
      warmup (float >= 0, default 5): seconds the dataset takes to load.
      since (connection|handler, default connection): when the warmup starts.
    """
    data = proxy.get_data(source)
    state = source.connection.state(name)
    if not to_backend or state.get('loaded') or not data:
        return dest.sendall(data)
    start = source.connection.opened if settings['since'] == 'connection' else proxy.epoch[1]
    parser = state.setdefault('parser', {})
    if time.monotonic() < start + settings['warmup']:
        count, _ = count_commands(parser, data)
        return source.sendall(LOADING_REPLY * count)
    count, used = count_commands(parser, data, until_idle=True)
    source.sendall(LOADING_REPLY * count)   # the end of a command begun while loading
    if _idle(parser):
        state['loaded'] = True
        dest.sendall(data[used:])
