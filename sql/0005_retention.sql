-- Retention (ADR 0016): what the owner's background job deletes, and what readers need to
-- tell "deleted by retention" from "never existed".

-- Entries up to and including pruned_seq may have been deleted: a reader asking for one of
-- them gets `history_gone`. Only ever raised, by the retention job.
ALTER TABLE groups ADD COLUMN pruned_seq BIGINT NOT NULL DEFAULT 0 CHECK (pruned_seq >= 0);

-- A Welcome's age (rows from before this migration count from now).
ALTER TABLE welcomes ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- "The inbox entries of group X" (consumed Welcomes are found per group by its owner) and
-- "the inbox entries that still use Welcome Y" (a Welcome nobody waits for is deleted).
CREATE INDEX inbox_by_group ON inbox (group_id, commit_seq);
CREATE INDEX inbox_by_welcome ON inbox (welcome_id);

-- A KeyPackage's not_after (Unix seconds, from its lifetime, checked at upload): expired ones
-- are never handed out and are deleted. NULL for rows stored before this migration.
ALTER TABLE key_packages ADD COLUMN not_after BIGINT;
ALTER TABLE last_resort_key_packages ADD COLUMN not_after BIGINT;
CREATE INDEX key_packages_not_after ON key_packages (not_after) WHERE not_after IS NOT NULL;
CREATE INDEX last_resort_not_after ON last_resort_key_packages (not_after)
    WHERE not_after IS NOT NULL;
