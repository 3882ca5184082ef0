-- Delivery Service: groups, their ordered logs, membership, Welcome inboxes and cursors.
--
-- Every group table leads with group_id, so the log partitions naturally by group (Citus or
-- per-shard databases later). The rules (see store/log.rs) are kept by the appending
-- transaction, which locks the groups rows it appends to (in group_id order) before reading
-- anything else: sequence numbers are taken under that lock, so commit order is seq order.

-- A group: its epoch, the last sequence number appended and the commit that started the epoch.
CREATE TABLE groups (
    group_id        BYTEA PRIMARY KEY CHECK (octet_length(group_id) BETWEEN 1 AND 256),
    epoch           BIGINT NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    last_seq        BIGINT NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    last_commit_seq BIGINT NOT NULL DEFAULT 0 CHECK (last_commit_seq >= 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
) WITH (fillfactor = 50);  -- room for HOT updates: every append rewrites its group's row

-- Who may read and write a group: members read the entries after joined_seq, up to and
-- including left_seq (NULL while still a member).
CREATE TABLE members (
    group_id   BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    identity   BYTEA NOT NULL,
    joined_seq BIGINT NOT NULL CHECK (joined_seq >= 0),
    left_seq   BIGINT CHECK (left_seq >= joined_seq),
    PRIMARY KEY (group_id, identity)
);

-- "The groups identity X is a current member of".
CREATE INDEX members_current_by_identity ON members (identity, group_id) WHERE left_seq IS NULL;

-- The ordered log: one row per message, however many members read it. No foreign key to
-- groups: rows are only written under the group's row lock after the group was read, and the
-- per-row trigger would cost on the hottest path.
CREATE TABLE group_log (
    group_id    BYTEA NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq >= 1),
    epoch       BIGINT NOT NULL CHECK (epoch >= 0),
    kind        SMALLINT NOT NULL CHECK (kind IN (0, 1, 2)),  -- application, commit, proposal
    message_id  BYTEA NOT NULL,
    payload     BYTEA NOT NULL,
    appended_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, seq)
);

-- A message id is appended at most once per group (a retried send finds the original).
CREATE UNIQUE INDEX group_log_message_id ON group_log (group_id, message_id);

-- A commit's Welcome, stored once however many members the commit adds.
CREATE TABLE welcomes (
    id         BIGSERIAL PRIMARY KEY,
    group_id   BYTEA NOT NULL,
    commit_seq BIGINT NOT NULL,
    payload    BYTEA NOT NULL,
    UNIQUE (group_id, commit_seq)
);

-- Per-identity inbox counter, taken under this row's lock so inbox seq order is commit order.
CREATE TABLE inbox_heads (
    identity BYTEA PRIMARY KEY,
    last_seq BIGINT NOT NULL CHECK (last_seq >= 0)
);

-- Welcomes waiting for an identity: 1, 2, 3 … per identity.
CREATE TABLE inbox (
    identity   BYTEA NOT NULL,
    seq        BIGINT NOT NULL CHECK (seq >= 1),
    group_id   BYTEA NOT NULL,
    commit_seq BIGINT NOT NULL,
    welcome_id BIGINT NOT NULL REFERENCES welcomes (id) ON DELETE CASCADE,
    PRIMARY KEY (identity, seq)
);

-- How far each member has processed each group (never moves backwards).
CREATE TABLE cursors (
    identity BYTEA NOT NULL,
    group_id BYTEA NOT NULL,
    seq      BIGINT NOT NULL CHECK (seq >= 0),
    PRIMARY KEY (identity, group_id)
);
