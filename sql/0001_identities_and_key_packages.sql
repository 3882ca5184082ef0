-- Authentication Service: identities, user names and KeyPackages.

-- A device identity: its 32-byte Ed25519 public key.
CREATE TABLE identities (
    identity      BYTEA PRIMARY KEY CHECK (octet_length(identity) = 32),
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- At most one name per identity, at most one identity per name. Names are stored normalised
-- (lower case), so the primary key is the uniqueness rule.
CREATE TABLE user_names (
    name       TEXT PRIMARY KEY,
    identity   BYTEA NOT NULL UNIQUE REFERENCES identities (identity) ON DELETE CASCADE,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Pooled KeyPackages: each is handed out once, oldest first, then deleted.
CREATE TABLE key_packages (
    id       BIGSERIAL PRIMARY KEY,
    identity BYTEA NOT NULL REFERENCES identities (identity) ON DELETE CASCADE,
    hash_ref BYTEA NOT NULL UNIQUE,
    data     BYTEA NOT NULL
);

-- "The oldest KeyPackage of identity X": an index range scan in id order.
CREATE INDEX key_packages_identity_id ON key_packages (identity, id);

-- The KeyPackage handed out (and kept) when an identity's pool is empty.
CREATE TABLE last_resort_key_packages (
    identity   BYTEA PRIMARY KEY REFERENCES identities (identity) ON DELETE CASCADE,
    hash_ref   BYTEA NOT NULL,
    data       BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
