"""Redis handlers: the failures a Redis client meets after a restart.

A Redis server that restarts with persistence answers every command with
``-LOADING Redis is loading the dataset in memory`` until its dataset is
read back from disk.  Clients see ``BusyLoadingError`` (redis-py),
``LOADING`` replies (Jedis, go-redis...), and their retry logic is tested.
"""

import time

import vaurien

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


@vaurien.traits(blocking=False)
def loading(source, dest, to_backend, name, settings, proxy):
    """Answers -LOADING to every command for the first `warmup` seconds, then relays.

    While loading, commands never reach the backend: each one, pipelined
    ones included, gets its own ``-LOADING Redis is loading the dataset in
    memory`` error, in order.  The clock starts when the handler was set,
    or the proxy started with it (since handler: a server restart, whose end
    every connection, live or new, sees at the same moment), or when each
    connection opens (since connection).  Mind that clients which reconnect
    on this error (redis-py drops the connection on each one) never get
    through with since connection.  A command that started during the
    warmup gets its error even if its last bytes come later; the connection
    then relays everything, unchanged, until the handler (or a behavior
    holding it) is set again: with since handler, that is a new restart,
    and a live connection's next chunk is taken to start a command.

    Settings:
      warmup (seconds >= 0, default 5): seconds the dataset takes to load.
      since (handler|connection, default handler): when the warmup starts: handler set (or proxy start), or connection open.
    """
    data = proxy.get_data(source)
    state = source.connection.state(name)
    by_handler = settings['since'] == 'handler'
    start = proxy.epoch[1] if by_handler else source.connection.opened
    if state.get('loaded') is not None and (not by_handler or state['loaded'] == start):
        return dest.sendall(data)   # warmed up
    if not to_backend or not data:
        return dest.sendall(data)
    if state.pop('loaded', None) is not None:   # set again: the restart starts over
        state.clear()
    parser = state.setdefault('parser', {})
    if time.monotonic() < start + settings['warmup']:
        count, _ = count_commands(parser, data)
        return source.sendall(LOADING_REPLY * count)
    count, used = count_commands(parser, data, until_idle=True)
    source.sendall(LOADING_REPLY * count)   # the end of a command begun while loading
    if _idle(parser):
        state['loaded'] = start
        dest.sendall(data[used:])
