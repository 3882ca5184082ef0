# The Authentication Service: identities, user names and single-use MLS KeyPackages.
# A client obtains this capability from `Bootstrap` once it has bound its identity to its Noise
# session; every call is scoped to that identity, so none takes "who am I" as a parameter.
@0x9841c460d17db3d6;

using Common = import "common.capnp";

interface AuthenticationService {
  uploadKeyPackages @0 (trace :Common.TraceContext, packages :List(Data), lastResort :Data)
      -> (remaining :UInt32);
  # Upload serialized KeyPackages for the caller's own identity (and, optionally, a last-resort
  # KeyPackage that is handed out when the pool is empty). Returns how many remain in the pool.

  fetchKeyPackages @1 (trace :Common.TraceContext, identities :List(Data))
      -> (packages :List(FetchedKeyPackage));
  # Fetch one KeyPackage for each identity key, consuming it atomically (the last-resort one is
  # returned, not consumed, when an identity's pool is empty). Identities with no KeyPackage
  # at all are left out of the result.

  keyPackageCount @2 (trace :Common.TraceContext) -> (remaining :UInt32, low :Bool);
  # How many of the caller's KeyPackages remain, and whether the client should top up.

  claimName @3 (trace :Common.TraceContext, name :Text) -> ();
  # Claim a unique user name for the caller's identity (first come, first served).

  resolveName @4 (trace :Common.TraceContext, name :Text) -> (identity :Data);
  # The identity key that owns a user name.

  namesOf @5 (trace :Common.TraceContext, identities :List(Data)) -> (names :List(Text));
  # The user name of each identity, in order (empty for an identity without a name).
}

struct FetchedKeyPackage {
  identity @0 :Data;
  package @1 :Data;
  lastResort @2 :Bool;
}
