//! The log store's SQL statements.

/// Creates the group and its creator's membership, unless the group exists; returns how
/// many groups it created.
pub(super) const CREATE_GROUP: &str = "
    WITH g AS (
        INSERT INTO groups (group_id) VALUES ($1)
        ON CONFLICT (group_id) DO NOTHING
        RETURNING group_id
    ),
    m AS (
        INSERT INTO members (group_id, identity, joined_seq)
        SELECT group_id, $2, 0 FROM g
    ),
    v AS (
        INSERT INTO group_views (group_id, epoch, group_info)
        SELECT group_id, $3, $6 FROM g WHERE $4::bytea IS NOT NULL
    ),
    s AS (
        INSERT INTO view_snapshots (group_id, seq, state, proposals)
        SELECT group_id, 0, $4, $5 FROM g WHERE $4::bytea IS NOT NULL
    )
    SELECT count(*) FROM g";

/// A group's latest GroupInfo and epoch.
pub(super) const GROUP_INFO: &str = "SELECT group_info, epoch FROM group_views WHERE group_id = $1";

/// A group's public view (ADR 0018), in one statement (so from one snapshot of the
/// database): a first row with the epoch, the GroupInfo and the latest snapshot, then the
/// messages kept after that snapshot, in log order (from the log, or copied into the tail
/// if retention deleted them there).
pub(super) const LOAD_VIEW: &str = "
    WITH v AS (
        SELECT epoch, group_info FROM group_views WHERE group_id = $1
    ),
    s AS (
        SELECT seq, state, proposals FROM view_snapshots
        WHERE group_id = $1 ORDER BY seq DESC LIMIT 1
    )
    SELECT v.epoch, v.group_info, s.state, s.proposals, NULL::bytea AS payload,
           -1::bigint AS seq
    FROM v, s
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, coalesce(t.payload, l.payload), t.seq
    FROM view_tail AS t CROSS JOIN s
    LEFT JOIN group_log AS l ON l.group_id = t.group_id AND l.seq = t.seq
    WHERE t.group_id = $1 AND t.seq > s.seq
    ORDER BY seq";

/// One row telling whether the group exists and the reader may read it, joined with the
/// entries it may read (none: a single row of NULL entry columns).
pub(super) const READ_LOG: &str = "
    SELECT s.known, s.joined_seq IS NOT NULL, l.seq, l.epoch, l.kind, l.message_id,
           l.payload, (extract(epoch FROM l.appended_at) * 1000000)::bigint,
           -- The first entry the reader asks for was deleted by retention.
           CASE WHEN greatest($3::bigint, s.joined_seq) + 1 <= s.pruned_seq
                     AND (s.left_seq IS NULL
                          OR greatest($3::bigint, s.joined_seq) + 1 <= s.left_seq)
                THEN s.pruned_seq END
    FROM (
        SELECT EXISTS (SELECT 1 FROM groups WHERE group_id = $1) AS known,
               (SELECT pruned_seq FROM groups WHERE group_id = $1) AS pruned_seq,
               m.joined_seq, m.left_seq
        FROM (SELECT 1) AS one
        LEFT JOIN members AS m ON m.group_id = $1 AND m.identity = $2
    ) AS s
    LEFT JOIN LATERAL (
        SELECT * FROM (
            SELECT g.*,
                   row_number() OVER (ORDER BY g.seq) AS n,
                   sum(octet_length(g.payload) + octet_length(g.message_id) + $6::bigint)
                       OVER (ORDER BY g.seq) AS upto
            FROM (
                SELECT * FROM group_log
                WHERE s.joined_seq IS NOT NULL
                  AND group_id = $1
                  AND seq > greatest($3::bigint, s.joined_seq)
                  AND (s.left_seq IS NULL OR seq <= s.left_seq)
                ORDER BY seq
                LIMIT $4
            ) AS g
        ) AS c
        -- One page: the first entry always, then entries while the bytes fit.
        WHERE c.n = 1 OR c.upto <= $5::bigint
    ) AS l ON true
    ORDER BY l.seq";

/// Whether the group exists, and whether `$2` is a current member of it.
pub(super) const CHECK_MEMBER: &str = "
    SELECT EXISTS (SELECT 1 FROM groups WHERE group_id = $1),
           EXISTS (SELECT 1 FROM members
                   WHERE group_id = $1 AND identity = $2 AND left_seq IS NULL)";

pub(super) const GROUP_SUMMARY: &str = "
    SELECT g.epoch, g.last_seq,
           ARRAY(SELECT identity FROM members
                 WHERE group_id = $1 AND left_seq IS NULL ORDER BY identity)
    FROM groups AS g WHERE g.group_id = $1";

pub(super) const GROUPS_OF: &str = "
    SELECT group_id FROM members WHERE identity = $1 AND left_seq IS NULL ORDER BY group_id";

/// One page of an inbox: the first Welcome always, then Welcomes while the bytes fit.
pub(super) const READ_INBOX: &str = "
    SELECT c.seq, c.group_id, c.commit_seq, c.payload
    FROM (
        SELECT p.*,
               row_number() OVER (ORDER BY p.seq) AS n,
               sum(octet_length(p.payload) + $5::bigint) OVER (ORDER BY p.seq) AS upto
        FROM (
            SELECT i.seq, i.group_id, i.commit_seq, w.payload
            FROM inbox AS i JOIN welcomes AS w ON w.id = i.welcome_id
            WHERE i.identity = $1 AND i.seq > $2
            ORDER BY i.seq
            LIMIT $3
        ) AS p
    ) AS c
    WHERE c.n = 1 OR c.upto <= $4::bigint
    ORDER BY c.seq";

/// Raises the cursor of anyone who is or was a member; returns whether they are.
pub(super) const SET_CURSOR: &str = "
    WITH m AS (
        SELECT 1 FROM members WHERE group_id = $2 AND identity = $1
    ),
    up AS (
        INSERT INTO cursors AS c (identity, group_id, seq)
        SELECT $1, $2, $3 FROM m
        ON CONFLICT (identity, group_id) DO UPDATE SET seq = EXCLUDED.seq
        WHERE c.seq < EXCLUDED.seq
    )
    SELECT EXISTS (SELECT 1 FROM m)";

pub(super) const CURSOR: &str = "SELECT seq FROM cursors WHERE identity = $1 AND group_id = $2";
