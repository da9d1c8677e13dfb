"""The database's tables: versioned migrations, run in order by SQLite (PRAGMA
user_version) and PostgreSQL (store.postgres) alike, and the column lists the tables'
readers share."""

from __future__ import annotations


def _rebuilt(table: str, columns: str) -> str:
    """A migration's statements giving table, rows kept, an INTEGER PRIMARY KEY id."""
    names = ", ".join(["id", *(c.split()[0] for c in columns.split(", "))])
    return (f"CREATE TABLE {table}_new (id INTEGER PRIMARY KEY, {columns}); "
            f"INSERT INTO {table}_new ({names}) SELECT {names} FROM {table}; "
            f"DROP TABLE {table}; ALTER TABLE {table}_new RENAME TO {table};")


MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE registrations (
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        push_jid TEXT NOT NULL,
        node TEXT NOT NULL,
        publish_options TEXT,
        enabled_at REAL NOT NULL,
        errors INTEGER NOT NULL DEFAULT 0,
        message_count INTEGER NOT NULL DEFAULT 0,
        subscription_count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, server, push_jid, node)
    );
    CREATE INDEX registrations_by_session ON registrations (user, server, resource);
    """,
    # version 2: the built-in app server's device registrations
    """
    CREATE TABLE devices (
        node TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        user TEXT NOT NULL,
        device_id TEXT NOT NULL,
        device_name TEXT NOT NULL DEFAULT '',
        provider TEXT NOT NULL,
        app_name TEXT NOT NULL,
        pubsub_host TEXT NOT NULL,
        token TEXT NOT NULL,
        application_id TEXT NOT NULL DEFAULT '',
        p256dh TEXT NOT NULL DEFAULT '',
        auth TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE INDEX devices_by_user ON devices (user, device_id);
    """,
    # version 3: per-user push options (urn:xmpp:push:options)
    """
    CREATE TABLE user_options (
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        senders INTEGER NOT NULL,
        message_count INTEGER NOT NULL,
        subscription_count INTEGER NOT NULL,
        message_bodies INTEGER NOT NULL,
        PRIMARY KEY (user, server)
    );
    """,
    # version 4: APNs VoIP (PushKit) tokens, for urgent pushes such as incoming calls
    """
    ALTER TABLE devices ADD COLUMN voip_token TEXT NOT NULL DEFAULT '';
    """,
    # version 5: restart recovery. Which ejabberd node a registration's session lives on
    # (in a cluster each node wakes its own users), when a pending session is to be woken
    # before its resume timeout runs out, notifications not yet answered by their app
    # server (they survive a crash of this process), and the last event batch handled.
    """
    ALTER TABLE registrations ADD COLUMN ejabberd_node TEXT NOT NULL DEFAULT '';
    ALTER TABLE registrations ADD COLUMN wake_due DOUBLE PRECISION;
    CREATE TABLE outbox (
        id BIGINT PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        push_jid TEXT NOT NULL,
        node TEXT NOT NULL,
        summary TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        due DOUBLE PRECISION NOT NULL,
        ejabberd_node TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE port_state (
        ejabberd_node TEXT NOT NULL,
        host TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (ejabberd_node, host)
    );
    """,
    # version 6: the built-in app server's pushes that a provider deferred (busy, down):
    # retried until delivered or too old, also by the next process after a crash
    """
    CREATE TABLE provider_queue (
        id BIGINT PRIMARY KEY,
        device_node TEXT NOT NULL,
        summary TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        due DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        ejabberd_node TEXT NOT NULL DEFAULT ''
    );
    """,
    # version 7: whether a registration's session is pending (ejabberdctl push_wake_all)
    """
    ALTER TABLE registrations ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    """,
    # version 8: exactly one push per message per registration, durably. A message pushed
    # to a pending session comes back when the session ends (offline storage, the archive),
    # also after a crash or a restart: what was pushed to each pending session since it
    # went pending (pending_since) is an append-only log, ids in time order (cheap to write
    # and to purge), read back by the next process. Errors of a registration are counted at
    # most once per window (last_error_at): a burst counts once.
    """
    CREATE TABLE pushed (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        mark BIGINT NOT NULL
    );
    ALTER TABLE registrations ADD COLUMN pending_since BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE registrations ADD COLUMN last_error_at DOUBLE PRECISION;
    """,
    # version 9: notifications waiting for the admin's async push logic (option logic):
    # the event is acknowledged with its row, and the next process finishes it.
    """
    CREATE TABLE hook_queue (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        stanza TEXT NOT NULL,
        ejabberd_node TEXT NOT NULL
    );
    """,
    # version 10: what a device registered at a provider written in Python (its declared
    # fields, JSON), see python_provider.py
    """
    ALTER TABLE devices ADD COLUMN extra TEXT NOT NULL DEFAULT '';
    """,
    # version 11: the Tigase push extensions a client sent with its enable (encryption key,
    # priority, filters: core/ios_extensions.to_json), "" for none
    """
    ALTER TABLE registrations ADD COLUMN extensions TEXT NOT NULL DEFAULT '';
    """,
    # version 12: a notification's id is its row's id. In SQLite only INTEGER PRIMARY KEY
    # is (BIGINT PRIMARY KEY made a second index, written with every notification and its
    # answer: a quarter of what those cost); PostgreSQL gets BIGINT PRIMARY KEY as before.
    f"""
    {_rebuilt("outbox", "user TEXT NOT NULL, server TEXT NOT NULL, push_jid TEXT NOT NULL, "
              "node TEXT NOT NULL, summary TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, "
              "due DOUBLE PRECISION NOT NULL, ejabberd_node TEXT NOT NULL DEFAULT ''")}
    {_rebuilt("provider_queue", "device_node TEXT NOT NULL, summary TEXT NOT NULL, "
              "attempt INTEGER NOT NULL, due DOUBLE PRECISION NOT NULL, "
              "created DOUBLE PRECISION NOT NULL, ejabberd_node TEXT NOT NULL DEFAULT ''")}
    """,
    # version 13: a device's pushes waiting at its provider are bounded (the newest kept,
    # see keep_newest_queued: found by device), and a device that only ever fails is given
    # up (failing_since: when its pushes began to fail, the same for all of them; NULL in
    # rows of before: created stands for it)
    """
    ALTER TABLE provider_queue ADD COLUMN failing_since DOUBLE PRECISION;
    CREATE INDEX provider_queue_by_device ON provider_queue (device_node, ejabberd_node, id);
    """,
    # version 14: UnifiedPush. An endpoint per (account, application, instance), found by
    # its token (the primary key: the index POSTs look it up by), sent to the full JID that
    # registered it last; its pushes kept until delivered or expired, in id order (ids
    # chosen by the service, increasing), payloads base64.
    """
    CREATE TABLE up_endpoints (
        token TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        application TEXT NOT NULL,
        instance TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_delivery DOUBLE PRECISION,
        UNIQUE (user, server, application, instance)
    );
    CREATE INDEX up_endpoints_by_session ON up_endpoints (user, server, resource);
    CREATE TABLE up_kept (
        id INTEGER PRIMARY KEY,
        token TEXT NOT NULL,
        topic TEXT,
        payload TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX up_kept_by_token ON up_kept (token, id);
    """,
)


_DEVICE_COLUMNS = ("node, secret, user, device_id, device_name, provider, app_name, "
                   "pubsub_host, token, application_id, p256dh, auth, voip_token, extra")
_COLUMNS = ("user, server, resource, push_jid, node, publish_options, errors, "
            "message_count, subscription_count, last_error_at, extensions")
_COLUMN_COUNT = _COLUMNS.count(",") + 1
_JOINED_COLUMNS = ", ".join(f"r.{column.strip()}" for column in _COLUMNS.split(","))
