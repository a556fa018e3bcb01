//! Randomness keyed by (seed, epoch, sample id): one ChaCha8 generator per sample, one stream
//! per operation, so a sample's draws depend on nothing else — not on the thread that runs
//! it, the number of ranks, or which other operations are configured.

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Identifies a sample's randomness: same key, same output bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// The run's seed.
    pub seed: u64,
    /// The epoch.
    pub epoch: u64,
    /// The sample's id in the dataset (not its position in a batch).
    pub sample_id: u64,
}

/// splitmix64: a full-avalanche mixer, so neighbouring keys give unrelated seeds.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of each operation (never reorder: the numbers are part of the output).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stream {
    Crop = 1,
    HorizontalFlip = 2,
    VerticalFlip = 3,
    Rotate = 4,
    Scale = 5,
    ColorJitter = 6,
    Grayscale = 7,
    Blur = 8,
    Policy = 9,
    Erase = 10,
    /// Batch-level mixing: keyed by the batch (`batch_rng`), never by a sample.
    Mix = 11,
}

impl SampleKey {
    /// The key of view `view` of this sample in its epoch (repeated augmentation): view 0 is
    /// the key itself, each other view an unrelated key, so views are independent
    /// augmentations.
    pub fn view(self, view: u32) -> SampleKey {
        if view == 0 {
            return self;
        }
        SampleKey {
            seed: splitmix64(self.seed ^ splitmix64(0x5645_4945_5753 ^ u64::from(view))),
            ..self
        }
    }

    fn seed_bytes(self) -> [u8; 32] {
        let h = splitmix64(splitmix64(splitmix64(self.seed) ^ self.epoch) ^ self.sample_id);
        let mut bytes = [0u8; 32];
        for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&splitmix64(h ^ i as u64).to_le_bytes());
        }
        bytes
    }

    /// The generator for one operation of this sample.
    pub(crate) fn rng(self, stream: Stream) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed_bytes());
        rng.set_stream(stream as u64);
        rng
    }
}

/// The generator of batch-level mixing for batch `index` of `rank` in `epoch`: its own stream,
/// so it shares nothing with any sample's draws whatever the numbers.
pub(crate) fn batch_rng(seed: u64, epoch: u64, rank: u32, index: u64) -> ChaCha8Rng {
    SampleKey {
        seed,
        epoch,
        sample_id: (u64::from(rank) << 40) ^ index,
    }
    .rng(Stream::Mix)
}

/// A standard normal draw (Box–Muller on two uniforms).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = uniform(rng, f64::MIN_POSITIVE, 1.0);
    let u2 = uniform(rng, 0.0, 1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Uniform in `[lo, hi)`, written out so the numbers do not depend on `rand`'s distribution
/// code.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    use rand::Rng;
    let u: f64 = (rng.random::<u64>() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    lo + (hi - lo) * u
}

/// Uniform integer in `[0, n)` (`n ≥ 1`) from **exactly one draw**, by 128-bit multiply and no
/// rejection (bias below `n / 2^64`): every call advances the operation's stream by one
/// `u64`, which keeps the later draws of a sample where they are.
///
/// Frozen into the output (every augmented pixel): never change it, nor swap it for its
/// exactly-uniform sibling [`crate::source::sampler::below_rejecting`] (the sampler's), which
/// may take more than one draw (see "Frozen random numbers" in `docs/sampling.md`).
pub(crate) fn below_one_draw(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    use rand::Rng;
    ((u128::from(rng.random::<u64>()) * u128::from(n)) >> 64) as u64
}

/// `true` with probability `p`.
pub(crate) fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    uniform(rng, 0.0, 1.0) < p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_and_repeat() {
        let k = SampleKey {
            seed: 1,
            epoch: 2,
            sample_id: 3,
        };
        let draw = |k: SampleKey, s| uniform(&mut k.rng(s), 0.0, 1.0);
        assert_eq!(draw(k, Stream::Crop), draw(k, Stream::Crop));
        assert_ne!(draw(k, Stream::Crop), draw(k, Stream::Rotate));
        assert_ne!(
            draw(k, Stream::Crop),
            draw(SampleKey { epoch: 3, ..k }, Stream::Crop)
        );
        assert_ne!(
            draw(k, Stream::Crop),
            draw(SampleKey { sample_id: 4, ..k }, Stream::Crop)
        );
        assert_ne!(
            draw(k, Stream::Crop),
            draw(SampleKey { seed: 0, ..k }, Stream::Crop)
        );
    }

    #[test]
    fn view_zero_is_the_key_and_other_views_differ() {
        let k = SampleKey {
            seed: 1,
            epoch: 2,
            sample_id: 3,
        };
        assert_eq!(k.view(0), k);
        let draw = |k: SampleKey| uniform(&mut k.rng(Stream::Crop), 0.0, 1.0);
        let draws: Vec<f64> = (0..4).map(|v| draw(k.view(v))).collect();
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(draws[i], draws[j], "views {i} and {j}");
            }
        }
        assert_eq!(k.view(2).sample_id, 3, "the sample stays the sample");
    }

    #[test]
    fn uniform_and_below_stay_in_range() {
        let mut rng = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        }
        .rng(Stream::Crop);
        for _ in 0..10_000 {
            let u = uniform(&mut rng, -2.0, 3.0);
            assert!((-2.0..3.0).contains(&u));
            assert!(below_one_draw(&mut rng, 7) < 7);
        }
        assert_eq!(below_one_draw(&mut rng, 1), 0);
    }
}
