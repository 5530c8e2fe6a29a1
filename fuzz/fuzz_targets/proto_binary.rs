//! Fuzz target: the binary heartbeat decoder, `geobeat::proto::Decoder::decode_binary`. Input:
//! one scope byte, one limit byte, then the frame. Checks: no panic; every accepted heartbeat obeys
//! the protocol (`geobeat_fuzz::check_slots`); re-encoding what was accepted decodes to the same
//! heartbeats; a reused decoder answers like a fresh one.
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
    let mut fresh = Decoder::new();
    let fresh_result = match fresh.decode_binary(frame, &ingest) {
        Ok(slots) => {
            geobeat_fuzz::check_slots(slots, &ingest);
            geobeat_fuzz::check_binary_agrees(&geobeat_fuzz::accepted(slots), &ingest);
            Ok(geobeat_fuzz::outcomes(slots))
        }
        Err(e) => Err(e),
    };
    REUSED.with(|d| {
        let mut d = d.borrow_mut();
        let reused = d
            .decode_binary(frame, &ingest)
            .map(|slots| geobeat_fuzz::outcomes(slots));
        assert_eq!(
            reused, fresh_result,
            "a reused decoder must answer like a fresh one"
        );
    });
});
