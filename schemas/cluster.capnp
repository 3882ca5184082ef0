# The internal interface between cluster nodes. An edge forwards the calls that order a group's
# log (createGroup, send) to the group's owner shard, and follows the live feeds of the groups
# and inboxes its clients subscribe to. A node obtains this capability from `Bootstrap.cluster`,
# which only answers peers whose Noise handshake presented a certificate signed by the cluster
# key.
@0xd7c3f16a2e0b9c41;

using Common = import "common.capnp";
using Envelope = import "envelope.capnp".Envelope;
using Delivery = import "delivery.capnp";

interface ShardService {
  createGroup @0 (trace :Common.TraceContext, groupId :Data, creator :Data, groupInfo :Data)
      -> ();
  # Register a new group with `creator` as its only member, at epoch 0, and its public view
  # built from the creator's GroupInfo.

  append @1 (trace :Common.TraceContext, request :AppendRequest)
      -> (result :Delivery.SendResult);
  # Append one message the edge has already checked (framing, group, sizes). The shard verifies
  # a commit or proposal against its public view of the group first. Acknowledged once durable.
  # Membership, group and verification errors come back as typed errors.

  watch @2 (groupId :Data, sink :EntrySink) -> (subscription :Delivery.Subscription);
  # Push entries this shard appends to the group from now on. Best effort: the edge's
  # subscribers read whatever they miss from the log.

  watchInboxes @3 (sink :InboxSink) -> (subscription :Delivery.Subscription);
  # Push the identities whose inbox received a Welcome through this shard, from now on.

  reportCommit @4 (trace :Common.TraceContext, groupId :Data, reporter :Data, seq :UInt64,
                   report :Data) -> (revertSeq :UInt64, epoch :UInt64);
  # A member's report of the commit at `seq` (DeliveryService.reportCommit): the shard checks
  # it and reverts the group. `reporter` is the bound identity of the client that sent it.
}

struct AppendRequest {
  groupId @0 :Data;
  sender @1 :Data;              # the bound identity of the client that sent it
  messageId @2 :Data;
  kind @3 :Envelope.Kind;       # application, commit or proposal
  epoch @4 :UInt64;
  payload @5 :Data;
  commit @6 :Delivery.CommitInfo;
  hasCommit @7 :Bool;           # a commit carries its Welcome and GroupInfo
}

interface EntrySink {
  deliver @0 (groupId :Data, entries :List(Envelope), resync :Bool,
              origins :List(Common.TraceContext), removals :List(Removal)) -> ();
  # `resync`: the shard may have dropped entries for this group (it fell behind); readers
  # should check the log. `origins`: when the shard is tracing, one trace context per entry,
  # in order, naming the append call that produced it (empty for an entry appended untraced);
  # the edge links the spans that push the entry to its subscribers to it. Absent when no
  # entry of the batch was traced. `removals`: the membership effect of each commit in the
  # batch, as the shard derived it from the verified commit (one per commit, empty when it
  # removed nobody); the edge ends the subscriptions of the removed members after the commit
  # and lets the others follow on without reading the log. A commit with no removal here
  # sends its subscribers to the log, as a commit from a shard that does not send them does.
}

struct Removal {
  seq @0 :UInt64;             # the commit's position in the log
  identities @1 :List(Data);  # the members it removed
}

interface InboxSink {
  notify @0 (identities :List(Data)) -> ();
}
