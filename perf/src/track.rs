//! Plausible device tracks for the load generator: each simulated device starts at a random
//! point and performs a random walk (heading drifts, speed varies between walking and driving).
//! It owns position, heading and speed of one device; it does not own timing or sequence numbers.
//! Invariant: every position it yields is a valid coordinate (latitude within [-85, 85], longitude
//! within [-180, 180)), so the server never rejects a heartbeat for its location.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Metres per degree of latitude (mean).
const METRES_PER_DEGREE: f64 = 111_320.0;
/// Latitude band the walk stays within, in degrees (away from the poles, where longitude degenerates).
const LATITUDE_ABS_MAX: f64 = 85.0;
/// Fastest simulated ground speed, in metres per second (a car on a motorway).
const SPEED_MPS_MAX: f32 = 40.0;
/// Largest heading change per step, in degrees.
const HEADING_DRIFT_DEG_MAX: f32 = 25.0;

/// One position report of a track.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fix {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Altitude in metres.
    pub alt_m: f32,
    /// Ground speed in metres per second.
    pub speed_mps: f32,
    /// Heading in degrees clockwise from north, within [0, 360).
    pub heading_deg: f32,
    /// Horizontal accuracy in metres.
    pub acc_m: f32,
}

/// A random walk for one device.
#[derive(Debug, Clone)]
pub struct Track {
    /// Current position and motion.
    fix: Fix,
    /// Per-device generator, seeded so runs are reproducible.
    rng: SmallRng,
}

impl Track {
    /// A walk starting at a random populated-latitude point chosen by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let fix = Fix {
            lat: rng.gen_range(-60.0..70.0),
            lon: rng.gen_range(-180.0..180.0),
            alt_m: rng.gen_range(0.0..500.0),
            speed_mps: rng.gen_range(0.0..SPEED_MPS_MAX),
            heading_deg: rng.gen_range(0.0..360.0),
            acc_m: rng.gen_range(3.0..30.0),
        };
        Self { fix, rng }
    }

    /// The current fix, without moving.
    pub fn fix(&self) -> Fix {
        self.fix
    }

    /// Moves the device for `dt_s` seconds and returns the new fix.
    pub fn step(&mut self, dt_s: f64) -> Fix {
        debug_assert!(dt_s >= 0.0 && dt_s.is_finite());
        let fix = &mut self.fix;
        fix.heading_deg = wrap_heading(
            fix.heading_deg
                + self
                    .rng
                    .gen_range(-HEADING_DRIFT_DEG_MAX..=HEADING_DRIFT_DEG_MAX),
        );
        fix.speed_mps = (fix.speed_mps + self.rng.gen_range(-2.0..=2.0)).clamp(0.0, SPEED_MPS_MAX);
        fix.alt_m = (fix.alt_m + self.rng.gen_range(-1.0..=1.0)).clamp(-100.0, 4000.0);
        let distance_m = f64::from(fix.speed_mps) * dt_s;
        let heading_rad = f64::from(fix.heading_deg).to_radians();
        let mut lat = fix.lat + distance_m * heading_rad.cos() / METRES_PER_DEGREE;
        if lat.abs() > LATITUDE_ABS_MAX {
            // Reflect off the band edge and turn around, as a vehicle would at a coast.
            lat = lat.signum() * (2.0 * LATITUDE_ABS_MAX - lat.abs());
            fix.heading_deg = wrap_heading(180.0 - fix.heading_deg);
        }
        let metres_per_lon_degree = METRES_PER_DEGREE * lat.to_radians().cos().max(0.01);
        let lon = fix.lon + distance_m * heading_rad.sin() / metres_per_lon_degree;
        fix.lat = lat.clamp(-LATITUDE_ABS_MAX, LATITUDE_ABS_MAX);
        let wrapped = (lon + 180.0).rem_euclid(360.0) - 180.0;
        // rem_euclid may round up to exactly the modulus for tiny negative inputs.
        fix.lon = if wrapped >= 180.0 { -180.0 } else { wrapped };
        self.fix
    }
}

/// `degrees` folded into [0, 360).
fn wrap_heading(degrees: f32) -> f32 {
    let wrapped = degrees.rem_euclid(360.0);
    // rem_euclid may round up to exactly the modulus for tiny negative inputs.
    if wrapped >= 360.0 {
        0.0
    } else {
        wrapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_stay_valid_and_move_plausibly() {
        // Checks over many seeds and long walks (including huge steps that would cross the
        // poles) that coordinates stay valid and ordinary steps move at most speed * dt.
        for seed in 0..200 {
            let mut track = Track::new(seed);
            for step in 0..500 {
                let before = track.fix();
                let dt_s = if step % 50 == 0 { 1.0e6 } else { 30.0 };
                let after = track.step(dt_s);
                assert!((-LATITUDE_ABS_MAX..=LATITUDE_ABS_MAX).contains(&after.lat));
                assert!((-180.0..180.0).contains(&after.lon), "lon {}", after.lon);
                assert!((0.0..360.0).contains(&after.heading_deg));
                assert!((0.0..=SPEED_MPS_MAX).contains(&after.speed_mps));
                if dt_s < 100.0 {
                    let dlat_m = (after.lat - before.lat).abs() * METRES_PER_DEGREE;
                    assert!(dlat_m <= f64::from(SPEED_MPS_MAX) * dt_s + 1e-6);
                }
            }
        }
    }

    #[test]
    fn same_seed_gives_the_same_walk() {
        // Checks reproducibility: two tracks with one seed yield identical fixes.
        let (mut a, mut b) = (Track::new(9), Track::new(9));
        for _ in 0..10 {
            assert_eq!(a.step(1.0), b.step(1.0));
        }
        assert_ne!(Track::new(1).fix(), Track::new(2).fix());
    }
}
