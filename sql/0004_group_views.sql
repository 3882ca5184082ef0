-- The Delivery Service's public view of each group (ADR 0012): the ratchet tree, group
-- context, transcript hash and confirmation tag the server verifies commits against (no
-- secrets), in a compact binary encoding, and the latest GroupInfo a committer uploaded.
-- Written with the group at creation and rewritten by each verified commit or proposal in the
-- append transaction that appends it.
CREATE TABLE group_views (
    group_id   BYTEA PRIMARY KEY REFERENCES groups (group_id) ON DELETE CASCADE,
    epoch      BIGINT NOT NULL CHECK (epoch >= 0),
    state      BYTEA NOT NULL,
    proposals  BYTEA NOT NULL DEFAULT '',
    group_info BYTEA NOT NULL
);

-- Public keys and signatures do not compress: store them out of line without trying.
ALTER TABLE group_views ALTER COLUMN state SET STORAGE EXTERNAL;
ALTER TABLE group_views ALTER COLUMN group_info SET STORAGE EXTERNAL;
