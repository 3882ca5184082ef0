# The capability a client receives right after the Noise handshake.
@0xc82073bf9887220d;

using Common = import "common.capnp";
using Auth = import "auth.capnp";
using Delivery = import "delivery.capnp";

interface Bootstrap {
  ping @0 (trace :Common.TraceContext, payload :Data)
      -> (payload :Data, role :Common.NodeRole, serverTimeMicros :UInt64);
  # Echo `payload` back. Used for liveness and round-trip measurement.

  bind @1 (trace :Common.TraceContext, identityKey :Data, signature :Data)
      -> (auth :Auth.AuthenticationService, delivery :Delivery.DeliveryService);
  # Bind this session to a device identity. `identityKey` is the 32-byte Ed25519 public key;
  # `signature` signs "quicproquo identity binding v1" || Noise handshake hash || the client's
  # Noise static public key. The returned capabilities serve that identity only; a session
  # binds one identity, once (binding the same identity again returns the same service).
}
