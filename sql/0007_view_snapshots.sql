-- A group's public view as snapshots plus the verified handshake messages after them
-- (ADR 0018). Each commit used to rewrite the whole encoded view (about the ratchet tree's
-- size: 1.4 MB for 1000 hybrid members) and copy the previous one for a revert; now a
-- snapshot is written at every 16th commit, and the commits and proposals after the latest
-- snapshot are kept here. A view is restored from its latest snapshot and the messages after
-- it. The snapshot before the latest, and the messages after it, are kept too, so the latest
-- commit can still be reverted (ADR 0015) when it is the one that took a snapshot.
CREATE TABLE view_snapshots (
    group_id  BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    -- The log seq of the last message the snapshot reflects.
    seq       BIGINT NOT NULL CHECK (seq >= 0),
    state     BYTEA NOT NULL,
    proposals BYTEA NOT NULL DEFAULT '',
    PRIMARY KEY (group_id, seq)
);

-- Public keys and signatures do not compress: store them out of line without trying.
ALTER TABLE view_snapshots ALTER COLUMN state SET STORAGE EXTERNAL;

-- The verified commits and proposals after the group's snapshots: their seqs in the group's
-- log, which holds their bytes. Retention copies a message's bytes here before it deletes the
-- message from the log (`payload` is NULL until then), so the log's retention never waits on
-- a view.
CREATE TABLE view_tail (
    group_id BYTEA NOT NULL REFERENCES groups (group_id) ON DELETE CASCADE,
    seq      BIGINT NOT NULL CHECK (seq > 0),
    payload  BYTEA,
    PRIMARY KEY (group_id, seq)
);

-- Each stored view reflects every message of its group's log: it becomes the snapshot at the
-- group's last seq; the view kept before the latest commit, the snapshot just before it.
INSERT INTO view_snapshots (group_id, seq, state, proposals)
    SELECT v.group_id, g.last_seq, v.state, v.proposals
    FROM group_views AS v JOIN groups AS g USING (group_id);
INSERT INTO view_snapshots (group_id, seq, state, proposals)
    SELECT group_id, commit_seq - 1, prev_state, coalesce(prev_proposals, '')
    FROM group_views
    WHERE prev_state IS NOT NULL AND commit_seq > 0
ON CONFLICT DO NOTHING;

ALTER TABLE group_views
    DROP COLUMN state,
    DROP COLUMN proposals,
    DROP COLUMN prev_state,
    DROP COLUMN prev_proposals;
