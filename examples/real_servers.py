"""Real servers for the examples' tests: MariaDB, memcached and PostgreSQL.

Each one starts on an ephemeral loopback port, in a temporary directory of
its own, as an unprivileged user when the tests run as root (mariadbd,
memcached and postgres refuse root), and is stopped - its directory removed
- when the `with` block ends, however it ends:

    with real_servers.memcached() as server:
        host, port = server.address

The port: a free one is picked (bound, then released); if another program
takes it meanwhile, the server exits at once and another port is tried.
Readiness: the server answers its own protocol (a login, a "version"), polled
until START_TIMEOUT, never a fixed sleep.  server.stop() and server.start()
restart it on the same port, with the same data.

missing(name) says why a server cannot run here (its binaries are not
installed, and how to install them) or returns None: the tests skip with it.
"""
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

LOOPBACK = '127.0.0.1'
START_TIMEOUT = 30.0   # seconds; each server is ready in well under one here
STOP_TIMEOUT = 10.0    # then it is killed
ATTEMPTS = 5           # ports tried when the one picked is taken meanwhile
SBIN = os.pathsep.join(['/usr/local/sbin', '/usr/sbin', '/sbin'])   # mariadbd lives there


def _which(name):
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _postgresql_bin():
    """The directory of initdb and postgres: on PATH, or Debian's newest
    /usr/lib/postgresql/VERSION/bin (not on PATH there)."""
    initdb = shutil.which('initdb')
    if initdb:
        bindir = os.path.dirname(os.path.realpath(initdb))
        if os.path.exists(os.path.join(bindir, 'postgres')):
            return bindir
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/postgres'),
                   key=lambda path: [int(n) for n in re.findall(r'\d+', path)])
    return os.path.dirname(found[-1]) if found else None


def missing(name):
    """Why server `name` (mariadb, memcached, postgresql) cannot run here, or None."""
    if name == 'mariadb':
        if not (_which('mariadbd') and _which('mariadb-install-db')):
            return 'mariadbd not installed (apt-get install mariadb-server)'
    elif name == 'memcached':
        if not _which('memcached'):
            return 'memcached not installed (apt-get install memcached)'
    elif name == 'postgresql':
        if not _postgresql_bin():
            return 'postgres and initdb not installed (apt-get install postgresql)'
    else:
        raise ValueError('unknown server %r' % name)
    return None


def _free_port():
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _unprivileged(*names):
    """(uid, gid) of the first user of `names` that exists, when we are root; else None."""
    if os.geteuid() != 0:
        return None
    for name in names:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError('running as root, and none of the users %s exists' % ', '.join(names))


def _demote(ids):
    """A preexec_fn that becomes user `ids` (uid, gid), or None to stay who we are."""
    if ids is None:
        return None
    uid, gid = ids

    def demote():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return demote


class Server:
    """A server process started by command(port): `address`, `stop()`, `start()`."""

    def __init__(self, name, command, ready, workdir, ids, stop_signal=signal.SIGTERM):
        self.name, self.command, self.ready = name, command, ready
        self.workdir, self.ids, self.stop_signal = workdir, ids, stop_signal
        self.log = os.path.join(workdir, name + '.log')
        self.address = None
        self.process = None

    def start(self):
        """Start on a free port (or on the same one again, after stop()), ready to serve."""
        ports = [self.address[1]] if self.address else [_free_port() for _ in range(ATTEMPTS)]
        for port in ports:
            if self._start((LOOPBACK, port)):
                self.address = (LOOPBACK, port)
                return self
        raise RuntimeError('%s did not start (%s), it said:\n%s' % (
            self.name, ' '.join(self.command(ports[-1])), self.log_tail()))

    def _start(self, address):
        """True when the server answers on `address`; False when it exited first
        (the port was taken meanwhile); raises after START_TIMEOUT."""
        with open(self.log, 'ab') as log:
            self.process = subprocess.Popen(
                self.command(address[1]), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir, preexec_fn=_demote(self.ids))
        deadline = time.monotonic() + START_TIMEOUT
        while self.process.poll() is None:
            if self.ready(address) and self.process.poll() is None:
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('%s not ready within %d s; it said:\n%s' % (
                    self.name, START_TIMEOUT, self.log_tail()))
            time.sleep(0.02)
        return False

    def stop(self):
        """Stop the server (killed if it takes over STOP_TIMEOUT s); the port is kept."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines=20):
        with contextlib.suppress(OSError), open(self.log, errors='replace') as log:
            return ''.join(log.readlines()[-lines:])
        return ''


@contextlib.contextmanager
def _running(name, command, ready, users, prepare=None, stop_signal=signal.SIGTERM):
    """A started Server in a fresh temporary directory owned by one of `users`;
    prepare(workdir, run) runs first (run: subprocess.run as that user)."""
    ids = _unprivileged(*users)
    workdir = tempfile.mkdtemp(prefix='vaurien-%s-' % name)
    server = Server(name, lambda port: command(workdir, port), ready, workdir, ids, stop_signal)
    try:
        if ids is not None:
            os.chown(workdir, *ids)
        if prepare is not None:
            with open(server.log, 'ab') as log:
                try:
                    prepare(workdir, lambda argv: subprocess.run(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        cwd=workdir, preexec_fn=_demote(ids), timeout=START_TIMEOUT,
                        check=True))
                except subprocess.CalledProcessError as exc:
                    raise RuntimeError('%s failed; it said:\n%s' % (
                        ' '.join(exc.cmd), server.log_tail())) from None
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- MariaDB -------------------------------------------------------------------

def _mysql_answers(address):
    import pymysql
    try:
        pymysql.connect(host=address[0], port=address[1], user='root', connect_timeout=1).close()
        return True
    except Exception:
        return False


def mariadb():
    """A MariaDB server with --skip-grant-tables: any user name logs in, no password.

    Its data directory is made by mariadb-install-db (about half a second).
    """
    def prepare(workdir, run):
        run([_which('mariadb-install-db'), '--no-defaults', '--datadir=' + workdir + '/data',
             '--skip-test-db', '--auth-root-authentication-method=normal'])

    def command(workdir, port):
        return [_which('mariadbd'), '--no-defaults', '--datadir=' + workdir + '/data',
                '--socket=' + workdir + '/mysqld.sock', '--pid-file=' + workdir + '/mysqld.pid',
                '--port=%d' % port, '--bind-address=' + LOOPBACK, '--skip-grant-tables',
                '--skip-name-resolve', '--skip-log-bin', '--innodb-buffer-pool-size=16M']
    return _running('mariadb', command, _mysql_answers, ('mysql', 'nobody'), prepare)


# -- memcached -----------------------------------------------------------------

def _memcached_answers(address):
    try:
        with socket.create_connection(address, timeout=1) as sock:
            sock.sendall(b'version\r\n')
            return sock.recv(100).startswith(b'VERSION ')
    except OSError:
        return False


def memcached():
    """A memcached server (TCP only, 16 MB)."""
    def command(workdir, port):
        return [_which('memcached'), '-l', LOOPBACK, '-p', str(port), '-U', '0', '-m', '16']
    return _running('memcached', command, _memcached_answers, ('memcache', 'nobody'))


# -- PostgreSQL ----------------------------------------------------------------

def _postgresql_answers(address):
    import pg8000.native
    try:
        pg8000.native.Connection('postgres', host=address[0], port=address[1], timeout=1).close()
        return True
    except Exception:
        return False


def postgresql():
    """A PostgreSQL server: user postgres, no password (trust), database postgres.

    Its cluster is made by initdb (about half a second); it is stopped with
    SIGINT, PostgreSQL's fast shutdown (SIGTERM waits for clients to leave).
    """
    bindir = _postgresql_bin()

    def prepare(workdir, run):
        run([os.path.join(bindir, 'initdb'), '-D', workdir + '/data', '-U', 'postgres',
             '--auth=trust', '--no-sync', '-E', 'UTF8'])

    def command(workdir, port):
        return [os.path.join(bindir, 'postgres'), '-D', workdir + '/data', '-p', str(port),
                '-k', workdir, '-c', 'listen_addresses=' + LOOPBACK, '-c', 'fsync=off',
                '-c', 'full_page_writes=off']
    return _running('postgresql', command, _postgresql_answers, ('postgres', 'nobody'),
                    prepare, stop_signal=signal.SIGINT)
