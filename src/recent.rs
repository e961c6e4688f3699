//! A bounded map that forgets the least recently used half of its entries when it is full:
//! the baselines, the plans of repeated statements, the projects' sessions and the
//! verified tokens are kept in one each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// The key of an entry made of `parts`: their SHA-256, each part ended by a zero byte so that
/// no two lists of parts run together into the same key.
pub fn key(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())
}

pub struct Recent<V> {
    entries: Mutex<HashMap<String, (u64, V)>>,
    clock: AtomicU64,
    max: usize,
}

impl<V: Clone> Recent<V> {
    /// A map of at most `max` entries.
    pub fn new(max: usize) -> Self {
        Self {
            entries: Mutex::default(),
            clock: AtomicU64::default(),
            max,
        }
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().expect("recent lock");
        let entry = entries.get_mut(key)?;
        entry.0 = tick;
        Some(entry.1.clone())
    }

    pub fn put(&self, key: &str, value: V) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().expect("recent lock");
        if entries.len() >= self.max {
            // Forget the least recently used half.
            let mut ticks: Vec<u64> = entries.values().map(|(t, _)| *t).collect();
            ticks.sort_unstable();
            let cut = ticks[(ticks.len() - 1) / 2];
            entries.retain(|_, (t, _)| *t > cut);
        }
        entries.insert(key.to_owned(), (tick, value));
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("recent lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_half_is_forgotten_when_full() {
        let recent = Recent::new(4);
        for k in ["a", "b", "c", "d"] {
            recent.put(k, k.to_owned());
        }
        // "a" and "b" used again: "c" and "d" are the least recently used.
        assert_eq!(recent.get("a").as_deref(), Some("a"));
        assert_eq!(recent.get("b").as_deref(), Some("b"));
        recent.put("e", "e".into());
        assert_eq!(recent.len(), 3);
        assert!(recent.get("c").is_none() && recent.get("d").is_none());
        assert!(recent.get("a").is_some() && recent.get("e").is_some());
    }
}
