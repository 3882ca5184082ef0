# The Delivery Service: ordered, MLS-content-unaware group logs, Welcome inboxes and live
# delivery. A client obtains this capability from `Bootstrap.bind`, scoped to its identity:
# it can only post to and read groups it is a member of, and only read its own inbox.
@0x94412611de4d27cb;

using Common = import "common.capnp";
using Envelope = import "envelope.capnp".Envelope;

interface DeliveryService {
  createGroup @0 (trace :Common.TraceContext, groupId :Data, groupInfo :Data) -> ();
  # Register a new group with the caller as its only member, at epoch 0. `groupInfo` is the
  # creator's GroupInfo (an MLSMessage with the ratchet tree extension) for epoch 0: the server
  # builds its public view of the group from it and verifies every commit against that view.

  send @1 (trace :Common.TraceContext, groupId :Data, messageId :Data, message :Data,
           commit :CommitInfo) -> (result :SendResult);
  # Append one MLS message. The server reads its kind and epoch from the public framing. A
  # commit or proposal must be a PublicMessage from the caller's own leaf, and is verified
  # against the server's public view of the group before it is appended (refused with
  # `bad_commit` naming the rule otherwise); the membership change is derived from the verified
  # commit. A commit must carry `commit` (its Welcome and the new epoch's GroupInfo, stored in
  # the same transaction). An application message must be a PrivateMessage. Acknowledged once
  # durable.

  fetch @2 (trace :Common.TraceContext, groupId :Data, afterSeq :UInt64, limit :UInt32)
      -> (entries :List(Envelope));
  # Entries after `afterSeq` that the caller may read, oldest first (catch-up).

  subscribe @3 (trace :Common.TraceContext, groupId :Data, afterSeq :UInt64,
                stream :MessageStream) -> (subscription :Subscription);
  # Push every entry after `afterSeq` to `stream`, then new ones as they are appended.

  acknowledge @4 (trace :Common.TraceContext, groupId :Data, seq :UInt64) -> ();
  # Store the caller's cursor: everything up to `seq` is processed.

  groups @5 (trace :Common.TraceContext) -> (groups :List(GroupInfo));
  # The groups the caller is a member of.

  inbox @6 (trace :Common.TraceContext, afterSeq :UInt64, limit :UInt32)
      -> (welcomes :List(Welcome));
  # Welcomes addressed to the caller.

  subscribeInbox @7 (trace :Common.TraceContext, afterSeq :UInt64, stream :InboxStream)
      -> (subscription :Subscription);
  # Push Welcomes after `afterSeq`, then new ones as they arrive.

  groupInfo @8 (trace :Common.TraceContext, groupId :Data)
      -> (groupInfo :Data, epoch :UInt64);
  # The group's latest GroupInfo (an MLSMessage, as its last committer or creator uploaded and
  # the server verified it) and its epoch. Current members only.

  reportCommit @9 (trace :Common.TraceContext, groupId :Data, seq :UInt64, report :Data)
      -> (revertSeq :UInt64, epoch :UInt64);
  # Report that the commit at `seq` cannot be processed (a bad confirmation or membership tag,
  # or path secrets: what the server's public view cannot check). `report` is the caller's
  # signed report (quicproquo_core::report, ADR 0015). If the caller was a member before the
  # commit and did not make it, the commit is still the group's latest, and no member other
  # than its committer has acknowledged it, the server reverts the group to the epoch before
  # it and appends a revert marker (kind `revert`, payload the report) at `revertSeq`; the
  # group is then at `epoch`. A commit already reverted answers with its marker. Refused with
  # `report_refused` naming the rule otherwise.

  subscribeFrames @10 (trace :Common.TraceContext, groupId :Data, afterSeq :UInt64,
                       tag :UInt64, windowBytes :UInt64)
                   -> (subscription :Subscription, windowBytes :UInt64);
  # Like `subscribe`, but the entries come as push frames beside RPC on this connection (a
  # frame header with its top bit set, holding a `PushFrame`), not as calls: one entry per
  # frame, encoded once per node for every subscriber of the group. Register the group's
  # handler before calling: frames may arrive before the answer. At most one such
  # subscription per group per connection.
  # The caller asks for a window of at most `windowBytes` (0: the server's choice); the
  # answer's `windowBytes` is the window granted, never more than asked. The server sends at
  # most that many bytes of entry frames (or one entry, if larger) beyond what the subscriber
  # acknowledged with a `PushAck` frame naming this `tag`; acknowledge about every quarter
  # window, at the latest. A subscriber may end the connection of a server that sends more.
  # Every call is followed by exactly one `PushFrame` with `ended` set, naming the group and
  # the caller's `tag`, whether the call was refused or the subscription ran and ended (the
  # subscriber was removed, after the commit that removed it, or the subscription was
  # dropped): no entry frame of it follows. A subscriber that waits for it before asking
  # again for the same group never takes one subscription's frames for another's.
}

struct CommitInfo {
  obsoleteAdded @0 :List(Data);    # must be empty: the server derives the change from the commit
  obsoleteRemoved @1 :List(Data);  # must be empty: the server derives the change from the commit
  welcome @2 :Data;        # the Welcome for the added members (empty if none)
  groupInfo @3 :Data;      # the new epoch's GroupInfo (an MLSMessage), signed by the committer
}

struct SendResult {
  union {
    appended @0 :Appended;
    duplicate @1 :UInt64;       # the message id was appended before, at this seq
    staleEpoch @2 :StaleEpoch;  # lost the epoch: catch up to `winnerSeq` and retry
  }
}

struct Appended {
  seq @0 :UInt64;
  epoch @1 :UInt64;  # the group's epoch after the append
}

struct StaleEpoch {
  currentEpoch @0 :UInt64;
  winnerSeq @1 :UInt64;
}

struct GroupInfo {
  groupId @0 :Data;
  epoch @1 :UInt64;
  lastSeq @2 :UInt64;
  members @3 :List(Data);
  cursor @4 :UInt64;  # the caller's acknowledged cursor
}

struct Welcome {
  seq @0 :UInt64;        # position in the caller's inbox
  groupId @1 :Data;
  commitSeq @2 :UInt64;  # the commit that added the caller: read the group after it
  welcome @3 :Data;
}

interface MessageStream {
  # Implemented by the subscriber. Batches arrive in order; the server awaits each call
  # before sending the next (flow control). Entries may repeat after a reconnect: dedupe by seq.
  deliver @0 (groupId :Data, entries :List(Envelope)) -> ();
}

struct PushFrame {
  # A server-to-subscriber push frame (see `DeliveryService.subscribeFrames`).
  union {
    entry @0 :Envelope;   # the group's next entry (its groupId names the subscription)
    ended @1 :Ended;      # the subscription ended
  }
}

struct Ended {
  groupId @0 :Data;
  tag @1 :UInt64;         # the `tag` the subscription was asked with
}

struct PushAck {
  # A subscriber-to-server push frame: the subscriber has taken every entry of the group's
  # frame subscription `tag` up to `seq` (flow control only; `acknowledge` stores the
  # cursor). One naming another subscription is ignored; a connection that keeps sending
  # acknowledgements that release nothing is closed.
  groupId @0 :Data;
  seq @1 :UInt64;
  tag @2 :UInt64;         # the `tag` the subscription was asked with
}

interface InboxStream {
  deliver @0 (welcomes :List(Welcome)) -> ();
}

interface Subscription {
  # Dropping this capability ends the subscription.
  close @0 () -> ();
}
