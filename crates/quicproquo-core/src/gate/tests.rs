use super::*;
use capnp::message::Builder;

fn words(m: &Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(m)
}

/// A `Return` with `n` bytes of results (large ones take a second segment).
fn a_return(n: usize) -> capnp::Result<Vec<u8>> {
    let mut m = Builder::new_default();
    let r = m.init_root::<message::Builder<'_>>().init_return();
    r.init_results()
        .init_content()
        .set_as::<capnp::data::Owned>(&vec![1u8; n][..])?;
    Ok(words(&m))
}

fn a_finish() -> Vec<u8> {
    let mut m = Builder::new_default();
    m.init_root::<message::Builder<'_>>()
        .init_finish()
        .set_question_id(7);
    words(&m)
}

/// Reads everything `input` yields through a gate of `max_words` and `max_calls`.
async fn through_gate(
    input: &[u8],
    max_words: usize,
    max_calls: Option<usize>,
) -> (io::Result<Vec<u8>>, Rc<GateState>) {
    use tokio::io::AsyncReadExt;
    let (reader, _writer, state) = gate(
        input,
        tokio::io::sink(),
        GateLimits {
            max_calls_in_flight: max_calls,
            max_words,
            ..GateLimits::default()
        },
    );
    let mut reader = reader;
    let mut out = Vec::new();
    let r = reader.read_to_end(&mut out).await.map(|_| out);
    (r, state)
}

#[tokio::test]
async fn messages_pass_whole_and_unchanged() -> capnp::Result<()> {
    let mut stream = a_return(40_000)?;
    stream.extend(a_finish());
    let (out, state) = through_gate(&stream, 1 << 20, None).await;
    assert_eq!(out?, stream);
    assert_eq!(
        state.buffered_bytes(),
        0,
        "buffers released after each message"
    );
    Ok(())
}

#[tokio::test]
async fn an_oversized_or_unknown_message_is_refused() -> capnp::Result<()> {
    let big = a_return(40_000)?;
    let (out, _) = through_gate(&big, 1000, None).await;
    assert!(out.is_err(), "40 kB over a 1000-word limit");

    let mut unknown = a_finish();
    unknown[16..18].copy_from_slice(&99u16.to_le_bytes());
    let (out, state) = through_gate(&unknown, 1 << 20, None).await;
    assert!(out.is_err());
    assert_eq!(state.refused(), Some("message of an unknown type"));

    // A header announcing a message that never comes holds only what arrived.
    let mut lie = 0u32.to_le_bytes().to_vec();
    lie.extend_from_slice(&100_000u32.to_le_bytes());
    lie.extend_from_slice(&[0u8; 64]);
    let (out, state) = through_gate(&lie, 1 << 20, None).await;
    assert!(out.is_err(), "truncated");
    assert!(state.buffered_bytes() <= 2048, "{}", state.buffered_bytes());
    Ok(())
}

#[test]
fn the_writer_counts_returns_however_the_stream_is_cut() -> capnp::Result<()> {
    let mut stream = Vec::new();
    stream.extend(a_return(10)?);
    stream.extend(a_finish());
    stream.extend(a_return(40_000)?); // two segments
    stream.extend(a_finish());
    stream.extend(a_return(0)?);
    for chunk in [1, 3, 7, 8, 64, 4096, stream.len()] {
        let mut scan = Scan::default();
        let found: usize = stream.chunks(chunk).map(|c| scan.feed(c)).sum();
        assert_eq!(found, 3, "cut every {chunk} bytes");
        assert_eq!(scan.head_len, 0, "ends between messages");
    }
    Ok(())
}
