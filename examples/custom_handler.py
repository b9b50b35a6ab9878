"""A custom Vaurien handler, wired in by examples/custom.ini.

Run it from the repository root (the ini file's folder is importable, so
``callable = custom_handler.shout`` finds this file)::

    python vaurien.py --config examples/custom.ini
    curl -s http://localhost:8000/            # a backend on localhost:8080

The backend is whatever answers on localhost:8080: with no server of your
own, ``python -m http.server 8080`` serves the current folder.

``@traits(blocking=False)`` promises that the handler never waits, so the
proxy calls it in its own loop, at full speed.  Leave it out for a handler
that sleeps or does blocking I/O: it then runs in a thread of its
connection, and holds up that connection only.
"""

from vaurien import traits


@traits(blocking=False)
def shout(source, dest, to_backend, name, settings, proxy):
    """Upper-cases the backend's replies, like a misbehaving middlebox.

    Requests go through untouched; the text of the replies is upper-cased
    (ASCII letters only, so lengths and framing are kept: an HTTP status line
    still parses, but a header's value or a JSON key changes case).  With
    `skip_headers`, an HTTP reply's head is left as it is and only its body
    shouts; this is done per chunk, so a head split over two chunks shouts
    its end.

    Settings:
      skip_headers (bool, default true): leave an HTTP reply's status line and headers alone.
    """
    data = proxy.get_data(source)
    if to_backend or not data:
        return dest.sendall(data)
    head, body = b'', data
    if settings['skip_headers'] and data.startswith(b'HTTP/'):
        end = data.find(b'\r\n\r\n')
        head, body = (data, b'') if end < 0 else (data[:end + 4], data[end + 4:])
    dest.sendall(head + body.upper())
