# Types shared by every quicproquo interface.
@0xffdec37f2b5e0ca1;

struct TraceContext {
  # W3C trace context carried by every request that crosses a process, so one trace covers
  # client -> edge -> shard -> store. Both fields are empty when the caller is not tracing.
  traceparent @0 :Text;
  tracestate @1 :Text;
}

enum NodeRole {
  # The role a server plays, as vouched for by the cluster key in its Noise handshake.
  edge @0;
  shard @1;
  standalone @2;
}
