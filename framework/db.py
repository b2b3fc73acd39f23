"""Caffe's key-value databases (LMDB and LevelDB), as in Caffe's ``util/db*.cpp``.

A database maps byte-string keys to byte-string values (normally serialized
``Datum`` records); readers walk the keys in sorted byte order.

    db = open_db("mnist_train_lmdb", "lmdb")          # read
    cursor = db.cursor()
    while cursor.valid:
        key, value = cursor.key, cursor.value
        cursor.next()

    with open_db("out_lmdb", "lmdb", mode="new") as db:  # create
        txn = db.transaction()
        txn.put(b"00000000", datum.SerializeToString())
        txn.commit()

Backends are named ``"lmdb"`` / ``"leveldb"`` (any case) or by the
``DataParameter.DB`` enum values (``LEVELDB = 0``, ``LMDB = 1``).  LMDB needs the
``lmdb`` package; LevelDB needs ``plyvel`` (``pip install plyvel``).

Modes (Caffe's ``db::Mode``): ``"read"``; ``"new"`` creates the database and
fails if it exists; ``"write"`` opens an existing one (LevelDB creates it if
missing).
"""
import os
import threading
import weakref

from .errors import CaffeError

LEVELDB, LMDB = 0, 1  # caffe.proto DataParameter.DB
_BACKEND_NAMES = {LEVELDB: "leveldb", LMDB: "lmdb"}
MODES = ("read", "write", "new")

# db_lmdb.cpp starts its map at 1 TB on 64-bit builds; newer Caffe grows it on
# MDB_MAP_FULL instead.  We start small and double, as the newer code does.
_LMDB_INITIAL_MAP_SIZE = 1 << 26


class DatabaseError(CaffeError):
    """A database is missing, is not of the expected backend, or cannot be written."""


def backend_name(backend):
    """Normalise a backend given as ``"lmdb"``/``"LEVELDB"`` or a DataParameter.DB value."""
    if isinstance(backend, str):
        name = backend.strip().lower()
        if name in ("lmdb", "leveldb"):
            return name
    elif backend in _BACKEND_NAMES:
        return _BACKEND_NAMES[int(backend)]
    raise DatabaseError(f"unknown database backend {backend!r} (expected 'lmdb' or 'leveldb')")


def open_db(path, backend, mode="read"):
    """Open the database at ``path`` with ``backend`` in ``mode``; returns an LMDB or LevelDB object."""
    if mode not in MODES:
        raise DatabaseError(f"unknown database mode {mode!r} (expected one of {', '.join(MODES)})")
    name = backend_name(backend)
    path = os.fspath(path)
    return LMDBDatabase(path, mode) if name == "lmdb" else LevelDBDatabase(path, mode)


def _check_readable_dir(path, backend):
    if not os.path.exists(path):
        raise DatabaseError(f"{backend} database '{path}' does not exist "
                            f"(relative paths are resolved against the current directory {os.getcwd()})")
    if not os.path.isdir(path):
        raise DatabaseError(f"'{path}' is not a {backend} database (it is a file, not a directory)")


class Cursor:
    """Walks a database's records in key order (Caffe's ``db::Cursor``).

    ``valid`` is False past the last record; ``next()`` advances;
    ``seek_to_first()`` rewinds.  ``key``/``value`` are ``bytes``.
    With ``wrap=True``, ``next()`` past the end rewinds to the first record,
    as Caffe's data reader does ("Restarting data prefetching from start").
    """

    def __init__(self, items_factory, wrap=False):
        self._factory = items_factory
        self.wrap = wrap
        self.epochs = 0
        self.seek_to_first()

    def seek_to_first(self):
        self._it = self._factory()
        self._advance()

    def _advance(self):
        try:
            self._key, self._value = next(self._it)
            self._valid = True
        except StopIteration:
            self._key = self._value = None
            self._valid = False

    @property
    def valid(self):
        return self._valid

    @property
    def key(self):
        if not self._valid:
            raise DatabaseError("cursor is past the last record")
        return self._key

    @property
    def value(self):
        if not self._valid:
            raise DatabaseError("cursor is past the last record")
        return self._value

    def next(self):
        """Advance one record (rewinding at the end when ``wrap`` is set)."""
        self._advance()
        if not self._valid and self.wrap:
            self.epochs += 1
            self.seek_to_first()

    def read(self, n):
        """The next ``n`` values as a list (wrapping if enabled), advancing past them."""
        out = []
        for _ in range(n):
            out.append(self.value)
            self.next()
        return out


class _Database:
    backend = None

    def __init__(self, path, mode):
        self.path = path
        self.mode = mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        """Iterate ``(key, value)`` pairs in key order."""
        return self._items()

    def keys(self):
        return (k for k, _ in self._items())

    def values(self):
        return (v for _, v in self._items())

    def cursor(self, wrap=False):
        """A Cursor at the first record."""
        self._need_open()
        return Cursor(self._items, wrap=wrap)

    def __len__(self):
        return sum(1 for _ in self._items())

    def _need_open(self):
        if self._closed:
            raise DatabaseError(f"{self.backend} database '{self.path}' is closed")

    def __repr__(self):
        return f"<{type(self).__name__} '{self.path}' ({self.mode})>"


# -- LMDB ------------------------------------------------------------------------
_lmdb_read_envs = weakref.WeakValueDictionary()  # one read environment per path and process
_lmdb_lock = threading.Lock()


def _import_lmdb():
    try:
        import lmdb
    except ImportError:
        raise DatabaseError("the LMDB backend needs the 'lmdb' package: pip install lmdb") from None
    return lmdb


class _SharedEnv:
    """Holds one lmdb.Environment (LMDB forbids opening the same file twice in a process).

    Read environments are cached by path while any holder reference lives
    (open databases and running cursors keep one).
    """

    def __init__(self, env):
        self.env = env


class LMDBDatabase(_Database):
    """An LMDB directory (``data.mdb`` + ``lock.mdb``), as Caffe's ``db_lmdb.cpp``.

    Readers open read-only without taking LMDB's lock file (Caffe's
    ALLOW_LMDB_NOLOCK fallback), so read-only folders work and readers never
    modify the database; one environment per path is shared inside a process.
    """

    backend = "lmdb"

    def __init__(self, path, mode="read"):
        super().__init__(path, mode)
        lmdb = _import_lmdb()
        self._closed = False
        if mode == "read":
            _check_readable_dir(path, "LMDB")
            if not os.path.isfile(os.path.join(path, "data.mdb")):
                raise DatabaseError(f"'{path}' is not an LMDB database (no data.mdb inside)")
            key = os.path.realpath(path)
            with _lmdb_lock:
                shared = _lmdb_read_envs.get(key)
                if shared is None:
                    try:
                        env = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                        max_readers=1024)
                    except lmdb.Error as e:
                        raise DatabaseError(f"cannot open LMDB database '{path}': {e}") from None
                    shared = _SharedEnv(env)
                    _lmdb_read_envs[key] = shared
            self._holder = shared
        else:
            if mode == "new":
                # db_lmdb.cpp: NEW mode mkdirs the folder and fails if it exists.
                if os.path.exists(path):
                    raise DatabaseError(f"cannot create LMDB database '{path}': it already exists")
                os.makedirs(path)
            elif not os.path.isdir(path):
                raise DatabaseError(f"LMDB database '{path}' does not exist")
            try:
                env = lmdb.open(path, map_size=_LMDB_INITIAL_MAP_SIZE, subdir=True)
            except lmdb.Error as e:
                raise DatabaseError(f"cannot open LMDB database '{path}' for writing: {e}") from None
            self._holder = _SharedEnv(env)

    @property
    def _env(self):
        self._need_open()
        return self._holder.env

    def _items(self):
        # The generator keeps the environment's holder alive (and so cached) while it runs.
        self._need_open()
        holder = self._holder
        with holder.env.begin(buffers=False) as txn:
            with txn.cursor() as cur:
                for key, value in cur:
                    yield key, value

    def __len__(self):
        self._need_open()
        return self._env.stat()["entries"]

    def get(self, key):
        """The value stored under ``key`` (bytes), or None."""
        self._need_open()
        with self._env.begin() as txn:
            return txn.get(_as_bytes(key))

    def transaction(self):
        """A write batch: ``put(key, value)`` then ``commit()``."""
        if self.mode == "read":
            raise DatabaseError(f"LMDB database '{self.path}' is open for reading only")
        self._need_open()
        return _LMDBTransaction(self)

    def close(self):
        if not self._closed:
            self._closed = True
            if self.mode != "read":
                self._holder.env.close()
            self._holder = None


class _LMDBTransaction:
    """Buffers puts and writes them in one LMDB transaction on ``commit``.

    On a full map the map size is doubled and the batch retried (db_lmdb.cpp's
    DoubleMapSize).
    """

    def __init__(self, db):
        self._db = db
        self._pending = []

    def put(self, key, value):
        self._pending.append((_as_bytes(key), bytes(value)))

    def commit(self):
        lmdb = _import_lmdb()
        env = self._db._env
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        self._pending = []


# -- LevelDB ---------------------------------------------------------------------
def _import_plyvel():
    try:
        import plyvel
    except ImportError:
        raise DatabaseError("the LevelDB backend needs the optional 'plyvel' package: "
                            "pip install plyvel (or use an LMDB database)") from None
    return plyvel


class LevelDBDatabase(_Database):
    """A LevelDB directory, as Caffe's ``db_leveldb.cpp`` (needs ``plyvel``).

    LevelDB locks a database per process, so read handles are shared by path
    inside a process (a TRAIN and a TEST net may read the same database).
    Note: LevelDB rewrites its files on open (log recovery), even for reading.
    """

    backend = "leveldb"

    def __init__(self, path, mode="read"):
        super().__init__(path, mode)
        plyvel = _import_plyvel()
        self._closed = True
        if mode == "read":
            _check_readable_dir(path, "LevelDB")
            if not os.path.isfile(os.path.join(path, "CURRENT")):
                raise DatabaseError(f"'{path}' is not a LevelDB database (no CURRENT file inside)")
            key = os.path.realpath(path)
            with _leveldb_lock:
                holder = _leveldb_read_handles.get(key)
                if holder is None:
                    holder = _SharedLevelDB(self._open(plyvel, path, mode))
                    _leveldb_read_handles[key] = holder
        else:
            if mode == "new" and os.path.exists(path):
                raise DatabaseError(f"cannot create LevelDB database '{path}': it already exists")
            holder = _SharedLevelDB(self._open(plyvel, path, mode))
        self._holder = holder
        self._closed = False

    @staticmethod
    def _open(plyvel, path, mode):
        try:
            # db_leveldb.cpp: block_size 64 KiB, write buffer 256 MiB, 100 open files.
            return plyvel.DB(path, create_if_missing=(mode != "read"), error_if_exists=(mode == "new"),
                             block_size=65536, write_buffer_size=268435456, max_open_files=100)
        except plyvel.Error as e:
            msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise DatabaseError(f"cannot open LevelDB database '{path}': {msg}") from None

    @property
    def _db(self):
        self._need_open()
        return self._holder.db

    def _items(self):
        self._need_open()
        holder = self._holder  # keeps the shared handle open while the generator runs
        it = holder.db.iterator()
        try:
            for key, value in it:
                yield key, value
        finally:
            it.close()

    def get(self, key):
        return self._db.get(_as_bytes(key))

    def transaction(self):
        if self.mode == "read":
            raise DatabaseError(f"LevelDB database '{self.path}' is open for reading only")
        return _LevelDBTransaction(self._db)

    def close(self):
        if not self._closed:
            self._closed = True
            if self.mode != "read":
                self._holder.db.close()
            self._holder = None


_leveldb_read_handles = weakref.WeakValueDictionary()
_leveldb_lock = threading.Lock()


class _SharedLevelDB:
    """Holds one plyvel.DB; closes it when the last holder reference goes."""

    def __init__(self, db):
        self.db = db
        weakref.finalize(self, db.close)


class _LevelDBTransaction:
    """A LevelDB WriteBatch: ``put`` buffers, ``commit`` writes (db_leveldb.hpp)."""

    def __init__(self, db):
        self._db = db
        self._batch = db.write_batch()

    def put(self, key, value):
        self._batch.put(_as_bytes(key), bytes(value))

    def commit(self):
        self._batch.write()
        self._batch = self._db.write_batch()


def _as_bytes(key):
    return key.encode() if isinstance(key, str) else bytes(key)
