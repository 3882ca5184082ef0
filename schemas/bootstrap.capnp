# The capability a client receives right after the Noise handshake.
@0xc82073bf9887220d;

using Common = import "common.capnp";

interface Bootstrap {
  ping @0 (trace :Common.TraceContext, payload :Data)
      -> (payload :Data, role :Common.NodeRole, serverTimeMicros :UInt64);
  # Echo `payload` back. Used for liveness and round-trip measurement.
}
