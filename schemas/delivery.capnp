# The Delivery Service: ordered, MLS-content-unaware group logs and live delivery.
# A client obtains this capability from `Bootstrap`, scoped to its bound identity.
@0x94412611de4d27cb;

using Common = import "common.capnp";
using Envelope = import "envelope.capnp".Envelope;

interface DeliveryService {
  append @0 (trace :Common.TraceContext, groupId :Data, messageId :Data, message :Data)
      -> (seq :UInt64);
  # Append one MLS message to a group's log. Acknowledged only once durable.

  subscribe @1 (trace :Common.TraceContext, groupId :Data, afterSeq :UInt64, stream :MessageStream)
      -> (subscription :Subscription);
  # Receive every entry after `afterSeq`, then new entries as they are appended.
}

interface MessageStream {
  # Implemented by the subscriber; the server pushes batches of log entries in order.
  deliver @0 (entries :List(Envelope)) -> ();
  # The server awaits each call before sending the next batch (flow control).
}

interface Subscription {
  # Dropping this capability ends the subscription.
  acknowledge @0 (seq :UInt64) -> ();
  # Store the subscriber's cursor: every entry up to `seq` has been processed.
}
