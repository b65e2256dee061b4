//! The stored and parked form of a user's [`SyncState`]: its JSON, compressed with LZ4.
//!
//! A state is mostly repeats: the states sent to a side whose echo is still due share all
//! but a field or two, and the held values and the field history are lists of near-equal
//! entries. So it compresses about four to one (6.5 KB to 1.5 KB in `bench drain`), and the
//! compression costs less than it saves: a SQLite upsert of 6.5 KB spans an overflow page and
//! every byte is written twice (WAL, then checkpoint), PostgreSQL would compress it again
//! itself, and the router's parked-state budget holds four times as many users.
//!
//! States stored by earlier versions as plain JSON text still load: the form is told by its
//! first byte.

use crate::sync::SyncState;

/// First byte of an LZ4-compressed JSON state (followed by the JSON's length, 4 bytes little
/// endian, and the LZ4 block). Plain JSON starts with `{`.
const LZ4_JSON: u8 = 1;

/// A stored length above this is taken for corruption rather than allocated.
const DECODED_MAX: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the stored state is empty")]
    Empty,
    #[error("the stored state has an unknown format (first byte {0:#04x})")]
    UnknownFormat(u8),
    #[error("the stored state claims {0} bytes uncompressed, more than any state")]
    TooLarge(usize),
    #[error("the stored state does not decompress: {0}")]
    Lz4(String),
    #[error("the stored state is not a valid state: {0}")]
    Json(#[from] serde_json::Error),
}

/// The state's stored form.
pub fn encode(state: &SyncState) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(state)?;
    let mut out = Vec::with_capacity(1 + 4 + lz4_flex::block::get_maximum_output_size(json.len()));
    out.push(LZ4_JSON);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&json));
    Ok(out)
}

/// A state from its stored form (or from the plain JSON of earlier versions).
pub fn decode(bytes: &[u8]) -> Result<SyncState, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Empty),
        Some(b'{') => Ok(serde_json::from_slice(bytes)?),
        Some(&LZ4_JSON) => {
            let (size, block) = lz4_flex::block::uncompressed_size(&bytes[1..])
                .map_err(|e| DecodeError::Lz4(e.to_string()))?;
            // LZ4 expands at most about 255:1, so a larger claim is corruption, not a state.
            if size > DECODED_MAX || size > block.len().saturating_mul(255).saturating_add(16) {
                return Err(DecodeError::TooLarge(size));
            }
            let json = lz4_flex::block::decompress(block, size)
                .map_err(|e| DecodeError::Lz4(e.to_string()))?;
            Ok(serde_json::from_slice(&json)?)
        }
        Some(&other) => Err(DecodeError::UnknownFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_state() -> SyncState {
        let mut state = SyncState {
            sent_ts_ms: 1_700_000_000_000,
            resends: 3,
            ..SyncState::default()
        };
        state.unsettled.push_back("evt_1".into());
        state
    }

    #[test]
    fn a_state_comes_back_as_it_went() -> Result<(), Box<dyn std::error::Error>> {
        let state = a_state();
        let stored = encode(&state)?;
        assert_eq!(stored[0], LZ4_JSON);
        assert_eq!(decode(&stored)?, state);
        Ok(())
    }

    #[test]
    fn fields_are_written_as_their_own_json_each_time() -> Result<(), Box<dyn std::error::Error>> {
        use crate::sync::Known;
        let map: protocol::user::CanonicalFields = [
            ("id".to_string(), serde_json::json!("u1")),
            (
                "name".to_string(),
                serde_json::json!("Ada \"the\" Countess"),
            ),
        ]
        .into_iter()
        .collect();
        let plain = format!(
            r#"{{"kind":"holds","fields":{}}}"#,
            serde_json::to_string(&map)?
        );
        let known = Known::holds(map);
        // The first write makes the text, the second reuses it: both as the map's own.
        assert_eq!(serde_json::to_string(&known)?, plain);
        assert_eq!(serde_json::to_string(&known)?, plain);
        assert_eq!(serde_json::from_str::<Known>(&plain)?, known);
        Ok(())
    }

    #[test]
    fn plain_json_of_earlier_versions_still_loads() -> Result<(), Box<dyn std::error::Error>> {
        let state = a_state();
        let json = serde_json::to_vec(&state)?;
        assert_eq!(decode(&json)?, state);
        Ok(())
    }

    #[test]
    fn damaged_states_are_errors_not_panics() {
        assert!(matches!(decode(b""), Err(DecodeError::Empty)));
        assert!(matches!(
            decode(b"\x07abc"),
            Err(DecodeError::UnknownFormat(7))
        ));
        // Claims 4 GiB.
        assert!(matches!(
            decode(b"\x01\xff\xff\xff\xffxyz"),
            Err(DecodeError::TooLarge(_))
        ));
        // Claims 64 bytes; the block is garbage.
        assert!(matches!(
            decode(b"\x01\x40\x00\x00\x00\xff\xff\xff"),
            Err(DecodeError::Lz4(_))
        ));
        assert!(decode(b"{not json").is_err());
    }
}
