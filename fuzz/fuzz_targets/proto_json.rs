//! Fuzz target: the JSON (text frame) heartbeat decoder, `geobeat::proto::Decoder::decode_text`.
//! Input: one scope byte, one limit byte, then the frame (taken as UTF-8 where valid, as the
//! WebSocket layer guarantees). Checks: no panic; every accepted heartbeat obeys the protocol
//! (`geobeat_fuzz::check_slots`); the binary decoder agrees on what JSON accepted; a decoder reused
//! across inputs (as each executor's is) gives the same answers as a fresh one.
#![no_main]

use std::cell::RefCell;

use geobeat::proto::Decoder;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static REUSED: RefCell<Decoder> = RefCell::new(Decoder::new());
}

fuzz_target!(|data: &[u8]| {
    let Some((ingest, frame)) = geobeat_fuzz::context(data) else {
        return;
    };
    let text = match std::str::from_utf8(frame) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&frame[..e.valid_up_to()]).unwrap(),
    };
    let mut fresh = Decoder::new();
    let fresh_result = match fresh.decode_text(text, &ingest) {
        Ok(slots) => {
            geobeat_fuzz::check_slots(slots, &ingest);
            geobeat_fuzz::check_binary_agrees(&geobeat_fuzz::accepted(slots), &ingest);
            Ok(geobeat_fuzz::outcomes(slots))
        }
        Err(e) => {
            assert!(e.close_code().is_none() || text.len() > geobeat::limits::FRAME_BYTES_MAX);
            Err(e)
        }
    };
    REUSED.with(|d| {
        let mut d = d.borrow_mut();
        let reused = d
            .decode_text(text, &ingest)
            .map(|slots| geobeat_fuzz::outcomes(slots));
        assert_eq!(
            reused, fresh_result,
            "a reused decoder must answer like a fresh one"
        );
    });
});
