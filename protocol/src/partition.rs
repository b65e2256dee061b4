//! Partitions (PROTOCOL.md §1, *Partitions*): the subject token that names a user, and the
//! partition NATS maps it to.
//!
//! Publishers end every subject with the user's token, so that the server's mapping
//! `{{partition(N,k)}}` sends all of one user's events, from either application and of any
//! type, to one partition. The engine never reads the user from the subject: the token only
//! chooses the partition, so a hashed token is as good as the id itself.

use sha2::{Digest, Sha256};

/// Characters of an id used as its own token at most. Longer ids are hashed: a subject has
/// to fit NATS's limits whatever the id.
pub const TOKEN_BYTES_MAX: usize = 128;

/// Partitions a deployment may configure at most.
pub const PARTITIONS_MAX: u32 = 1024;

/// The subject token of user `id`: the id itself when NATS accepts it as a token (printable
/// ASCII without `.`, `*` or `>`, at most [`TOKEN_BYTES_MAX`]), otherwise `h` followed by
/// the first 16 hex digits of the id's SHA-256. Both plugins implement the same rule
/// (`@sync-engine/common`'s `subjectToken`), checked against the same vectors.
pub fn subject_token(id: &str) -> String {
    if is_plain_token(id) {
        return id.to_string();
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut token = String::with_capacity(17);
    token.push('h');
    for byte in &digest[..8] {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

fn is_plain_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= TOKEN_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'))
}

/// The partition nats-server's `{{partition(partitions, k)}}` gives a subject whose k-th
/// token is `token`: FNV-1a (32 bits) of the token, modulo the partitions. The engine checks
/// at startup that the server agrees (a probe through the mapping).
pub fn partition_of(token: &str, partitions: u32) -> u32 {
    assert!((1..=PARTITIONS_MAX).contains(&partitions));
    fnv1a32(token.as_bytes()) % partitions
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fnv1a_matches_its_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn ids_nats_cannot_carry_are_hashed() {
        assert_eq!(subject_token("u_123"), "u_123");
        for id in [
            "a.b",
            "a b",
            "a*",
            ">",
            "",
            "é",
            "a\u{0}b",
            &"x".repeat(129),
        ] {
            let token = subject_token(id);
            assert_eq!(token.len(), 17, "{id:?}");
            assert!(token.starts_with('h') && is_plain_token(&token), "{id:?}");
        }
        assert_ne!(subject_token("a.b"), subject_token("a b"));
    }

    proptest! {
        #[test]
        fn every_id_has_a_token_nats_accepts(id in ".{0,200}") {
            let token = subject_token(&id);
            prop_assert!(is_plain_token(&token));
            prop_assert_eq!(token.clone(), subject_token(&id));
            prop_assert!(partition_of(&token, 16) < 16);
        }
    }
}
