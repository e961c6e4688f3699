//! Signed checkpoints and the Merkle tree they sign.
//!
//! The log's records are the leaves of an RFC 6962 Merkle tree (ct-merkle): leaf `i` is the
//! SHA-256 record hash of record `i`. A checkpoint is the tree's size and root, with a time,
//! signed with the gateway's Ed25519 key. Anyone holding only the public key can then check
//! that a record is in the log (inclusion proof) and that a later checkpoint extends an earlier
//! one (consistency proof), so records cannot be edited, removed or reordered once signed.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditError;

/// The Merkle tree over record hashes.
pub type Tree = MemoryBackedTree<Sha256, [u8; 32]>;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// A signed statement: "the log had `size` records and this Merkle root at `time`".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub size: u64,
    /// Hex RFC 6962 root of the first `size` records.
    pub root: String,
    pub time: String,
    /// Hex Ed25519 signature over [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes signed: versioned, so a signature cannot be reused for another format.
    pub fn message(size: u64, root: &str, time: &str) -> Vec<u8> {
        format!("sde-gateway audit checkpoint v1\n{size}\n{root}\n{time}\n").into_bytes()
    }

    /// True when the signature is valid for `key`.
    pub fn signed_by(&self, key: &PublicKey) -> bool {
        let Ok(signature) = hex::decode(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&Checkpoint::message(self.size, &self.root, &self.time), &signature)
            .is_ok()
    }
}

/// The gateway's checkpoint signing key.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// An Ed25519 public key (32 bytes), read from and written as SPKI PEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn unpem(label: &str, text: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or_else(|| format!("not a PEM {label}"))?;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad PEM {label}: {e}"))
}

fn read_text(path: &Path) -> Result<String, AuditError> {
    std::fs::read_to_string(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })
}

impl SigningKey {
    /// A new key, as PKCS#8 PEM.
    pub fn generate_pem() -> String {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("Ed25519 key generation");
        pem("PRIVATE KEY", doc.as_ref())
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        let der = unpem("PRIVATE KEY", text)?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(Self)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))
    }

    pub fn load(path: &Path) -> Result<Self, AuditError> {
        Self::from_pem(&read_text(path)?).map_err(|reason| AuditError::Key {
            path: path.to_owned(),
            reason,
        })
    }

    pub fn public_key(&self) -> PublicKey {
        let bytes: [u8; 32] = self
            .0
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public key is 32 bytes");
        PublicKey(bytes)
    }

    pub fn sign(&self, size: u64, root: String, time: String) -> Checkpoint {
        let signature = hex::encode(self.0.sign(&Checkpoint::message(size, &root, &time)).as_ref());
        Checkpoint {
            size,
            root,
            time,
            signature,
        }
    }
}

impl PublicKey {
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem("PUBLIC KEY", &der)
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        let der = unpem("PUBLIC KEY", text)?;
        match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(key) if key.len() == 32 => Ok(Self(key.try_into().expect("32 bytes"))),
            _ => Err("not an Ed25519 public key".into()),
        }
    }

    pub fn load(path: &Path) -> Result<Self, AuditError> {
        Self::from_pem(&read_text(path)?).map_err(|reason| AuditError::Key {
            path: path.to_owned(),
            reason,
        })
    }
}

/// Hex root of a tree.
pub fn root_hex(tree: &Tree) -> String {
    hex::encode(tree.root().as_bytes())
}

/// RFC 6962 roots of a growing prefix of leaves, in time and memory logarithmic in its size:
/// the roots of the perfect subtrees that make it up, largest (leftmost) first. Checking every
/// checkpoint of a log this way reads each record once; rebuilding each checkpoint's tree took
/// two minutes for 470 000 records and 486 checkpoints.
#[derive(Debug, Default)]
pub struct Frontier {
    subtrees: Vec<(u32, [u8; 32])>,
    size: u64,
}

impl Frontier {
    pub fn push(&mut self, leaf: &[u8; 32]) {
        let mut node: [u8; 32] = Sha256::new().chain_update([0u8]).chain_update(leaf).finalize().into();
        let mut height = 0;
        while let Some(&(h, left)) = self.subtrees.last() {
            if h != height {
                break;
            }
            self.subtrees.pop();
            node = parent(&left, &node);
            height += 1;
        }
        self.subtrees.push((height, node));
        self.size += 1;
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Hex root of the leaves pushed so far (empty for none, as checkpoints of no records say).
    pub fn root_hex(&self) -> String {
        let mut subtrees = self.subtrees.iter().rev();
        let Some(&(_, mut root)) = subtrees.next() else {
            return String::new();
        };
        for (_, left) in subtrees {
            root = parent(left, &root);
        }
        hex::encode(root)
    }
}

fn parent(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The tree of the first `size` leaves of `tree` (a past checkpoint's tree).
pub fn prefix(tree: &Tree, size: u64) -> Tree {
    let mut t = Tree::new();
    for leaf in &tree.items()[..size as usize] {
        t.push(*leaf);
    }
    t
}

/// Decodes a record hash (hex) into a leaf.
pub fn leaf(hash: &str) -> Option<[u8; 32]> {
    hex::decode(hash).ok()?.try_into().ok()
}

fn root(size: u64, root: &str) -> Option<RootHash<Sha256>> {
    let bytes: [u8; 32] = hex::decode(root).ok()?.try_into().ok()?;
    Some(RootHash::new(bytes.into(), size))
}

fn join(proof: &[String]) -> Option<Vec<u8>> {
    proof
        .iter()
        .map(|h| hex::decode(h).ok())
        .collect::<Option<Vec<_>>>()
        .map(|v| v.concat())
}

fn split(bytes: &[u8]) -> Vec<String> {
    bytes.chunks(32).map(hex::encode).collect()
}

/// Inclusion proof of leaf `index` in the tree of the first `size` leaves.
pub fn prove_inclusion(tree: &Tree, index: u64, size: u64) -> Vec<String> {
    let proof: InclusionProof<Sha256> = if size == tree.len() {
        tree.prove_inclusion(index as usize)
    } else {
        prefix(tree, size).prove_inclusion(index as usize)
    };
    split(proof.as_bytes())
}

/// Consistency proof from the tree of `old` leaves to that of `new` leaves (`0 < old < new`).
pub fn prove_consistency(tree: &Tree, old: u64, new: u64) -> Vec<String> {
    let proof: ConsistencyProof<Sha256> = if new == tree.len() {
        tree.prove_consistency((new - old) as usize)
    } else {
        prefix(tree, new).prove_consistency((new - old) as usize)
    };
    split(proof.as_bytes())
}

/// Checks that the record with hash `record_hash` is leaf `index` of the tree (`size`, `root_hex`).
pub fn verify_inclusion(size: u64, root_hex: &str, index: u64, record_hash: &str, proof: &[String]) -> bool {
    let (Some(root), Some(leaf), Some(bytes)) = (root(size, root_hex), leaf(record_hash), join(proof)) else {
        return false;
    };
    root.verify_inclusion(&leaf, index, &InclusionProof::from_bytes(bytes))
        .is_ok()
}

/// Checks that the tree (`old`, `old_root`) is a prefix of the tree (`new`, `new_root`).
pub fn verify_consistency(old: u64, old_root: &str, new: u64, new_root: &str, proof: &[String]) -> bool {
    if old == new {
        return old_root == new_root && proof.is_empty();
    }
    let (Some(old_root), Some(new_root), Some(bytes)) = (root(old, old_root), root(new, new_root), join(proof)) else {
        return false;
    };
    let Ok(proof) = ConsistencyProof::try_from_bytes(bytes) else {
        return false;
    };
    new_root.verify_consistency(&old_root, &proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(n: u8) -> Tree {
        let mut t = Tree::new();
        for i in 0..n {
            t.push([i; 32]);
        }
        t
    }

    #[test]
    fn keys_round_trip_through_pem_and_signatures_bind_every_field() {
        let key = SigningKey::from_pem(&SigningKey::generate_pem()).unwrap();
        let public = PublicKey::from_pem(&key.public_key().to_pem()).unwrap();
        let c = key.sign(3, "ab".into(), "t".into());
        assert!(c.signed_by(&public));
        for forged in [
            Checkpoint { size: 4, ..c.clone() },
            Checkpoint {
                root: "ac".into(),
                ..c.clone()
            },
            Checkpoint {
                time: "u".into(),
                ..c.clone()
            },
        ] {
            assert!(!forged.signed_by(&public));
        }
        let other = SigningKey::from_pem(&SigningKey::generate_pem()).unwrap().public_key();
        assert!(!c.signed_by(&other));
        assert!(SigningKey::from_pem("nonsense").is_err());
    }

    #[test]
    fn the_frontier_gives_the_trees_root_at_every_size() {
        let t = tree(40);
        let mut frontier = Frontier::default();
        assert_eq!(frontier.root_hex(), "");
        for (i, leaf) in t.items().iter().enumerate() {
            frontier.push(leaf);
            assert_eq!(
                frontier.root_hex(),
                root_hex(&prefix(&t, i as u64 + 1)),
                "size {}",
                i + 1
            );
        }
    }

    #[test]
    fn proofs_verify_against_past_roots_and_fail_when_altered() {
        let t = tree(7);
        for size in 1..=7u64 {
            let root = root_hex(&prefix(&t, size));
            for i in 0..size {
                let proof = prove_inclusion(&t, i, size);
                assert!(verify_inclusion(size, &root, i, &hex::encode([i as u8; 32]), &proof));
                assert!(!verify_inclusion(size, &root, i, &hex::encode([99u8; 32]), &proof));
            }
            for old in 1..size {
                let proof = prove_consistency(&t, old, size);
                let old_root = root_hex(&prefix(&t, old));
                assert!(verify_consistency(old, &old_root, size, &root, &proof), "{old}->{size}");
                let wrong = root_hex(&prefix(&tree(old as u8 + 1), old + 1));
                assert!(!verify_consistency(old, &wrong, size, &root, &proof));
            }
        }
    }
}
