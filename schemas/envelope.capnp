# The unit the Delivery Service stores and delivers: one opaque MLS message in a group's log.
@0xe0e368260071db46;

struct Envelope {
  groupId @0 :Data;
  # Opaque MLS group id (the DS never interprets it beyond routing).

  seq @1 :UInt64;
  # Position in the group's log: per group, gap-free, starting at 1.

  epoch @2 :UInt64;
  # MLS epoch read from the public framing of the message.

  kind @3 :Kind;
  enum Kind {
    application @0;
    commit @1;
    proposal @2;
    welcome @3;
    revert @4;
    # Written by the server, never sent by a member: the group was reverted to the epoch
    # before the commit at the seq the payload (a member's signed commit report, ADR 0015)
    # names. `epoch` is the group's epoch after the revert.
  }

  messageId @4 :Data;
  # Client-chosen id that makes a retried send idempotent.

  payload @5 :Data;
  # The serialized MLSMessage. Never decrypted by the server.

  appendedAtMicros @6 :UInt64;
  # Server time (Unix microseconds) at which the append became durable.
}
