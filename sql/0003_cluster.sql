-- Cluster membership: each Delivery Service shard holds a lease it renews; edges read the live
-- set and build the same consistent-hash ring from it.
--
-- Leases are judged by the database clock (now()), never by a node's own clock, so nodes with
-- skewed clocks still agree on who is alive. Every change to the set of shards (a shard
-- joining, leaving or expiring, or moving to another address) bumps ring_version in the same
-- transaction: two readers that see the same version see the same set.

CREATE TABLE shard_leases (
    node_id     TEXT PRIMARY KEY CHECK (length(node_id) BETWEEN 1 AND 128),
    address     TEXT NOT NULL CHECK (length(address) BETWEEN 1 AND 255),
    noise_key   BYTEA NOT NULL CHECK (octet_length(noise_key) = 32),
    lease_until TIMESTAMPTZ NOT NULL,
    joined_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE ring_version (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    version   BIGINT NOT NULL CHECK (version >= 0)
);

INSERT INTO ring_version (singleton, version) VALUES (true, 0);
