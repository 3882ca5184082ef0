-- Reverting a reported commit (ADR 0015). The public view keeps, next to its current state,
-- the state before the group's latest commit, the commit's seq and its committer, so the
-- Delivery Service can put the group back to the epoch before a validly signed commit that
-- members cannot process. Only the latest commit can be reverted: these columns are filled by
-- each commit's append transaction and cleared by a revert.
ALTER TABLE group_views
    ADD COLUMN commit_seq      BIGINT NOT NULL DEFAULT 0 CHECK (commit_seq >= 0),
    ADD COLUMN committer       BYTEA,
    ADD COLUMN prev_epoch      BIGINT CHECK (prev_epoch >= 0),
    ADD COLUMN prev_state      BYTEA,
    ADD COLUMN prev_proposals  BYTEA,
    ADD COLUMN prev_group_info BYTEA,
    ADD COLUMN prev_commit_seq BIGINT CHECK (prev_commit_seq >= 0);

ALTER TABLE group_views ALTER COLUMN prev_state SET STORAGE EXTERNAL;
ALTER TABLE group_views ALTER COLUMN prev_group_info SET STORAGE EXTERNAL;

-- A revert marker in the log: kind 3, written by the server (never sent by a member).
ALTER TABLE group_log DROP CONSTRAINT group_log_kind_check;
ALTER TABLE group_log ADD CONSTRAINT group_log_kind_check CHECK (kind IN (0, 1, 2, 3));
