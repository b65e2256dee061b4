//! The subject-token vectors (`protocol/vectors/subject_tokens.json`), which the plugins'
//! tests check too: both sides of the wire give every user the same token and partition.

use protocol::partition::{partition_of, subject_token};

#[derive(serde::Deserialize)]
struct Vector {
    id: String,
    token: String,
    partition_of_16: u32,
}

#[test]
fn tokens_and_partitions_match_the_shared_vectors() {
    let text = include_str!("../vectors/subject_tokens.json");
    let vectors: Vec<Vector> = serde_json::from_str(text).expect("valid vectors");
    assert!(vectors.len() >= 8);
    for vector in vectors {
        assert_eq!(subject_token(&vector.id), vector.token, "{:?}", vector.id);
        assert_eq!(partition_of(&vector.token, 16), vector.partition_of_16);
    }
}
