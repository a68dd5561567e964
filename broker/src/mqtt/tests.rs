//! The front end's pure parts: header peeking, CONNECT flags, read sizing, and rumqttd's
//! codec on arbitrary bytes.

use super::handshake::connect_flags;
use super::inbound::peek_publish_ids;
use super::*;
use proptest::prelude::*;

#[test]
fn read_size_grows_while_reads_fill_and_shrinks_when_quiet() {
    let mut size = ReadSize::new();
    let mut buf = BytesMut::with_capacity(READ_BUF_IDLE);
    // A busy client: every read fills the room it had.
    for _ in 0..12 {
        let room = size.prepare(&mut buf);
        assert!(room >= 64, "room {room}");
        buf.extend_from_slice(&vec![0u8; room]);
        size.read(room, room);
        buf.clear();
    }
    assert_eq!(size.want, READ_BUF_KEEP);
    assert!(size.prepare(&mut buf) >= READ_BUF_KEEP / 2);
    // Quiet again: small reads halve it, and the large buffer is given back.
    for _ in 0..12 {
        let room = size.prepare(&mut buf);
        size.read(2, room);
    }
    assert_eq!(size.want, READ_BUF_IDLE);
    size.prepare(&mut buf);
    assert!(buf.capacity() <= 2 * READ_BUF_IDLE, "{}", buf.capacity());
}

#[test]
fn connect_flags_are_read_from_the_header() {
    // CONNECT, remaining length 12, "MQTT", level 4, flags 0b1100_0011.
    let mut p = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0011];
    assert_eq!(connect_flags(&p), Some(0b1100_0011));
    p.truncate(9);
    assert_eq!(connect_flags(&p), None, "not all there yet");
    assert_eq!(connect_flags(&[0x30, 0]), None, "not a CONNECT");
}

#[test]
fn peeked_ids_match_the_encoded_publish() {
    for (qos, pkid, topic_len, payload_len) in [
        (1, 7, 3, 5),
        (1, 65535, 300, 20000),
        (0, 0, 10, 0),
        (1, 1, 0, 0),
    ] {
        let topic = "t".repeat(topic_len);
        let qos_level = if qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let p = publish_with(&topic, &vec![1u8; payload_len], qos_level, pkid, false);
        let mut buf = BytesMut::new();
        V4.write(Packet::Publish(p, None), &mut buf).unwrap();
        assert_eq!(
            peek_publish_ids(&buf),
            Some((qos, if qos == 1 { pkid } else { 0 }))
        );
    }
    assert_eq!(peek_publish_ids(&[0x30]), None);
    assert_eq!(peek_publish_ids(&[0x82, 0x02, 0, 1]), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn peek_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = peek_publish_ids(&bytes);
        let _ = connect_flags(&bytes);
    }

    /// Whatever a client sends, decoding returns a packet or an error, never a panic.
    #[test]
    fn codec_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            if V4.read_mut(&mut buf, 1024).is_err() {
                break;
            }
        }
    }

    /// Same, for inputs that start like a real packet of each type.
    #[test]
    fn codec_never_panics_on_plausible_headers(
        kind in 1u8..16, flags in 0u8..16, len in 0u8..128,
        body in proptest::collection::vec(any::<u8>(), 0..160),
    ) {
        let mut bytes = vec![(kind << 4) | flags, len];
        bytes.extend(body);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = V4.read_mut(&mut buf, 1024);
    }
}
