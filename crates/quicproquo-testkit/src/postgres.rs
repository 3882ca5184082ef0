//! Throwaway Postgres databases for tests (being written).
