# The capability a client receives right after the Noise handshake.
@0xc82073bf9887220d;

using Common = import "common.capnp";
using Auth = import "auth.capnp";
using Delivery = import "delivery.capnp";
using Cluster = import "cluster.capnp";

interface Bootstrap {
  ping @0 (trace :Common.TraceContext, payload :Data)
      -> (payload :Data, role :Common.NodeRole, serverTimeMicros :UInt64);
  # Echo `payload` back. Used for liveness and round-trip measurement.

  bind @1 (trace :Common.TraceContext, identityKey :Data, signature :Data,
           events :SessionEvents)
      -> (auth :Auth.AuthenticationService, delivery :Delivery.DeliveryService);
  # Bind this session to a device identity. `identityKey` is the 32-byte Ed25519 public key;
  # `signature` signs "quicproquo identity binding v1" || Noise handshake hash || the client's
  # Noise static public key. The returned capabilities serve that identity only; a session
  # binds one identity, once (binding the same identity again returns the same service).
  # `events` (optional) is how the node tells the client about the session itself.
  # Only edge and standalone nodes serve clients; a shard refuses with `wrong_role`.

  cluster @2 (trace :Common.TraceContext) -> (shard :Cluster.ShardService);
  # The internal shard interface. Only a shard answers, and only to a peer that presented a
  # node certificate signed by the cluster key in its Noise handshake (`not_a_node` otherwise).
}

interface SessionEvents {
  # Implemented by the client.
  draining @0 () -> ();
  # The node is shutting down: connect to another node and resubscribe from your cursors.
  # Calls in progress still complete on this connection.
}
