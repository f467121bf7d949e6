//! Who the clients are and what they hold: the malicious set, the clients
//! chosen each round, and every client's private data pool, all functions
//! of the seed alone (the same for every defense and scenario).

use crate::config::ExperimentConfig;
use crate::data::{Encoded, Rng, encode_all};
use crate::experiment::Setup;
use crate::scenario::Scenario;

/// Labels client `k` of `clients` as malicious when it is among the first
/// `malicious` of a seeded permutation (the same for every defense).
pub fn malicious_set(clients: usize, malicious: usize, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..clients).collect();
    Rng::derive(seed, &[0x4D41_4C49]).shuffle(&mut order);
    let mut flags = vec![false; clients];
    for &k in order.iter().take(malicious) {
        flags[k] = true;
    }
    flags
}

/// Clients sampled in `round` (the same for every defense and share).
pub fn selection(config: &ExperimentConfig, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..config.clients).collect();
    if config.clients_per_round < config.clients {
        Rng::derive(config.seed, &[0x0053_454C, round as u64]).shuffle(&mut order);
        order.truncate(config.clients_per_round);
        order.sort_unstable();
    }
    order
}

/// Pool tag of benign data.
pub const BENIGN: u32 = 0;
/// Pool tag of all-harmful data.
pub const HARMFUL: u32 = 1000;

/// The encoded training splits.
pub struct Pools {
    benign: Vec<Encoded>,
    harmful: Vec<Encoded>,
    size: usize,
}

impl Pools {
    /// Encodes the benign and malicious training splits.
    pub fn new(setup: &Setup<'_>) -> Self {
        Pools {
            benign: encode_all(setup.codec, &setup.corpus.benign_train),
            harmful: encode_all(setup.codec, &setup.corpus.malicious_train),
            size: setup.config.samples_per_client,
        }
    }

    /// A private pool: `tag`/1000 of its rows harmful, the rest benign
    /// (tag 0 = benign client, 1000 = the paper's malicious client). The
    /// pool depends only on (tag, index, seed); the all-benign and
    /// all-harmful pools are those of the original example.
    pub fn pool(&self, tag: u32, index: u64, seed: u64) -> Vec<Encoded> {
        let draw = |malicious: bool, count: usize| -> Vec<Encoded> {
            let source = if malicious {
                &self.harmful
            } else {
                &self.benign
            };
            let mut order: Vec<usize> = (0..source.len()).collect();
            Rng::derive(seed, &[u64::from(malicious), index, 0x504F_4F4C]).shuffle(&mut order);
            order
                .iter()
                .cycle()
                .take(count)
                .filter_map(|&i| source.get(i).cloned())
                .collect()
        };
        match tag {
            BENIGN => draw(false, self.size),
            HARMFUL.. => draw(true, self.size),
            share => {
                let bad = ((self.size * share as usize) as f64 / 1000.0).round() as usize;
                let mut pool = draw(true, bad);
                pool.extend(draw(false, self.size - bad.min(self.size)));
                Rng::derive(seed, &[u64::from(share), index, 0x4D49_5844]).shuffle(&mut pool);
                pool
            }
        }
    }
}

/// Pool tag of a malicious client in `scenario`: 0 = benign, 1000 = all
/// harmful, else the harmful share in percent.
pub fn pool_tag(scenario: Scenario, malicious: bool) -> u32 {
    if malicious {
        (scenario.harmful_share() * 1000.0).round() as u32
    } else {
        BENIGN
    }
}
